"""The `simulator` engine: replicas run the built-in simulator server
(`control_plane.endpoints.engines.simulator`), with or without a model behind them."""

from __future__ import annotations

from pydantic import Field

from control_plane.endpoints.engines.base import Engine, EngineArgs, EngineRequest
from workflows.contracts.clusters import ClusterKind
from workflows.contracts.common import Integer
from workflows.contracts.endpoints import (
    PORT_PLACEHOLDER,
    PYTHON_PLACEHOLDER,
    EngineKind,
    LaunchSpec,
    Resources,
)

MODULE = "control_plane.endpoints.engines.simulator"
# The image the project builds (docker/Dockerfile) holds the simulator too.
DEFAULT_IMAGE = "control-plane:latest"


class SimulatorArgs(EngineArgs):
    ttft_ms: float = Field(default=50.0, ge=0, le=600_000)
    itl_ms: float = Field(default=10.0, ge=0, le=60_000)
    output_tokens: Integer = Field(default=16, ge=1, le=1_000_000)
    max_output_tokens: Integer = Field(default=4096, ge=1, le=1_000_000)
    max_concurrency: Integer = Field(default=8, ge=1, le=100_000)
    max_queue: Integer = Field(default=256, ge=0, le=1_000_000)
    seed: Integer = Field(default=0, ge=0, le=2**63 - 1)
    load_time_s: float = Field(default=0.0, ge=0, le=3600)
    # Failure injection (testing what sits in front): see the simulator's module.
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    fail_after: Integer = Field(default=0, ge=0, le=2**31)
    fail_status: Integer = Field(default=500, ge=400, le=599)
    fail_retry_after_s: Integer = Field(default=1, ge=0, le=3600)
    fail_mid_stream: bool = False
    cpu: float = Field(default=0.25, gt=0, le=64)
    memory_mb: Integer = Field(default=128, ge=16, le=1_048_576)
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)


def render(request: EngineRequest, args: SimulatorArgs) -> LaunchSpec:
    python = PYTHON_PLACEHOLDER if request.cluster_kind is ClusterKind.LOCAL else "python"
    host = "127.0.0.1" if request.cluster_kind is ClusterKind.LOCAL else "0.0.0.0"
    command = [
        python,
        "-m",
        MODULE,
        "--host",
        host,
        "--port",
        PORT_PLACEHOLDER,
        "--model",
        request.served_model_name,
        "--ttft-ms",
        str(args.ttft_ms),
        "--itl-ms",
        str(args.itl_ms),
        "--output-tokens",
        str(args.output_tokens),
        "--max-output-tokens",
        str(args.max_output_tokens),
        "--max-concurrency",
        str(args.max_concurrency),
        "--max-queue",
        str(args.max_queue),
        "--seed",
        str(args.seed),
        "--load-time-s",
        str(args.load_time_s),
        "--fail-rate",
        str(args.fail_rate),
        "--fail-after",
        str(args.fail_after),
        "--fail-status",
        str(args.fail_status),
        "--fail-retry-after-s",
        str(args.fail_retry_after_s),
    ]
    if args.fail_mid_stream:
        command.append("--fail-mid-stream")
    return LaunchSpec(
        engine=EngineKind.SIMULATOR,
        served_model_name=request.served_model_name,
        command=command,
        image=args.image if request.cluster_kind is ClusterKind.KUBERNETES else None,
        resources=Resources(cpu=args.cpu, memory_mb=args.memory_mb),
        startup_timeout_s=60.0 + args.load_time_s,
        probe_path="/v1/completions",
        probe_body={"model": request.served_model_name, "prompt": "ping", "max_tokens": 1},
    )


ENGINE = Engine(
    kind=EngineKind.SIMULATOR,
    args=SimulatorArgs,
    render=render,
    needs_model=False,
    description="built-in OpenAI-compatible LLM simulator with vLLM metrics",
)
