"""The `vllm` engine: replicas run vLLM's OpenAI-compatible server (`vllm serve`).

Where the weights come from depends on the cluster: a local replica serves the files the
deploy worker put under `{model_dir}`; a pod on Kubernetes has no such files, so it
downloads a Hugging Face model itself, pinned to the revision onboarding recorded. Models
from other sources cannot be served on Kubernetes yet.
"""

from __future__ import annotations

import math
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from control_plane.endpoints.engines.base import (
    Engine,
    EngineArgs,
    EngineArgsError,
    EngineRequest,
    ModelInfo,
)
from workflows.contracts.clusters import ClusterKind
from workflows.contracts.common import Integer
from workflows.contracts.endpoints import (
    K8S_NAME_PATTERN,
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    SECRET_KEY_PATTERN,
    CacheVolume,
    EngineKind,
    LaunchSpec,
    Resources,
    SecretEnv,
)
from workflows.contracts.models import SourceKind

DEFAULT_IMAGE = "vllm/vllm-openai:v0.11.0"
# Where a `model_cache_claim` is mounted; HF_HOME points there.
CACHE_MOUNT_PATH = "/model-cache"
# vLLM loads a large model for minutes (download, weights, CUDA graph capture).
DEFAULT_STARTUP_TIMEOUT_S = 900.0
# Host memory when the weights' size is unknown, and what is added to it when known:
# weights pass through host memory while loading, and the server itself needs some.
DEFAULT_MEMORY_MB = 32_768
MIN_MEMORY_MB = 16_384
OVERHEAD_MEMORY_MB = 8_192
_MIB = 1024 * 1024
# Parser and plugin names ("hermes", "llama3_json", "deepseek_r1"): argv-safe, no paths.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"

# Flags `render` sets, and flags that would make the replica unreachable to the control
# plane (its own port and address, an API key its probes do not send, TLS on a URL we
# call over HTTP) or read a file of the replica's host (`--config`).
RESERVED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--uds",
        "--revision",
        "--tokenizer-revision",
        "--tensor-parallel-size",
        "-tp",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--dtype",
        "--tool-call-parser",
        "--enable-auto-tool-choice",
        "--reasoning-parser",
        "--max-num-seqs",
        "--api-key",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
        "--config",
    }
)


def _flag_name(arg: str) -> str:
    """`--Served_Model_Name=x` -> `--served-model-name`: vLLM accepts underscores too."""
    name = arg.split("=", 1)[0].lower()
    if name.startswith("--"):
        return "--" + name[2:].replace("_", "-")
    return name


class VllmArgs(EngineArgs):
    tensor_parallel_size: Integer = Field(default=1, ge=1, le=64)
    max_model_len: Integer | None = Field(default=None, ge=16, le=100_000_000)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    tool_call_parser: str | None = Field(default=None, pattern=_NAME_PATTERN)
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = Field(default=None, pattern=_NAME_PATTERN)
    max_num_seqs: Integer | None = Field(default=None, ge=1, le=1_000_000)
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    cpu: float = Field(default=4.0, gt=0, le=1024)
    # Default: from the weights' size (see `_memory_mb`).
    memory_mb: Integer | None = Field(default=None, ge=1024, le=16_777_216)
    startup_timeout_s: float = Field(default=DEFAULT_STARTUP_TIMEOUT_S, ge=60, le=86_400)
    # Kubernetes only. A Secret in the cluster's namespace holding a Hugging Face token
    # (for gated or private repositories), read by the pod itself: the token never
    # passes through the control plane.
    hf_token_secret: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=253)
    hf_token_secret_key: str = Field(default="HF_TOKEN", pattern=SECRET_KEY_PATTERN)
    # Kubernetes only. A PersistentVolumeClaim (ReadWriteMany for several replicas) to
    # keep downloaded weights in, so a restarted or added pod does not download again.
    model_cache_claim: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=253)
    # More `vllm serve` arguments, as argv items ("--enforce-eager", "--seed", "7").
    extra_args: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("extra_args")
    @classmethod
    def _no_reserved_flags(cls, value: list[str]) -> list[str]:
        for arg in value:
            if not arg or len(arg) > 1024 or any(ord(c) < 32 for c in arg):
                raise ValueError(
                    "each item must be 1 to 1024 characters without control characters"
                )
            if not arg.startswith("-"):
                continue
            name = _flag_name(arg)
            # argparse also takes unambiguous abbreviations (`--serv` for
            # `--served-model-name`), so a prefix of a reserved flag is reserved too.
            if any(reserved.startswith(name) for reserved in RESERVED_FLAGS if name != "-"):
                raise ValueError(
                    f"{arg.split('=', 1)[0]} is set by the control plane (or would make the "
                    "replica unreachable) and cannot be passed in extra_args"
                )
        return value

    @model_validator(mode="after")
    def _tool_choice_needs_parser(self) -> Self:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice requires tool_call_parser")
        return self


def _model_ref(request: EngineRequest, model: ModelInfo) -> list[str]:
    """What `vllm serve` is given as the model: a directory or a pinned repository."""
    if request.cluster_kind is ClusterKind.LOCAL:
        return [MODEL_DIR_PLACEHOLDER]
    if model.source_kind != SourceKind.HUGGINGFACE:
        raise EngineArgsError(
            f"the vllm engine on Kubernetes serves only Hugging Face models (pods download "
            f"them); model {model.name!r} comes from {model.source_kind!r}, whose stored "
            "files Kubernetes replicas cannot read yet"
        )
    if not model.pinned_revision:
        raise EngineArgsError(
            f"model {model.name!r} is not pinned to a revision yet; finish onboarding it first"
        )
    # The tokenizer's revision defaults to the branch head, not to `--revision`.
    revision = model.pinned_revision
    return [model.source_ref, "--revision", revision, "--tokenizer-revision", revision]


def _max_model_len(request: EngineRequest, args: VllmArgs, model: ModelInfo) -> int | None:
    model_context = model.context_length
    if args.max_model_len is not None:
        if model_context is not None and args.max_model_len > model_context:
            raise EngineArgsError(
                f"max_model_len {args.max_model_len} exceeds the context length of model "
                f"{model.name!r} ({model_context})"
            )
        return args.max_model_len
    known = [n for n in (request.context_length, model_context) if n]
    return min(known) if known else None


def _memory_mb(args: VllmArgs, model: ModelInfo) -> int:
    if args.memory_mb is not None:
        return args.memory_mb
    if not model.weights_bytes:
        return DEFAULT_MEMORY_MB
    weights_mb = math.ceil(model.weights_bytes / _MIB)
    return min(16_777_216, max(MIN_MEMORY_MB, math.ceil(weights_mb * 1.25) + OVERHEAD_MEMORY_MB))


def render(request: EngineRequest, args: VllmArgs) -> LaunchSpec:
    model = request.model
    if model is None:
        raise EngineArgsError("the vllm engine needs a model")
    local = request.cluster_kind is ClusterKind.LOCAL
    # A local replica listens on loopback only: nothing guards it but the gateway.
    host = "127.0.0.1" if local else "0.0.0.0"
    command = [
        "vllm",
        "serve",
        *_model_ref(request, model),
        "--served-model-name",
        request.served_model_name,
        "--host",
        host,
        "--port",
        PORT_PLACEHOLDER,
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
    ]
    max_model_len = _max_model_len(request, args, model)
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if args.dtype != "auto":
        command += ["--dtype", args.dtype]
    if args.max_num_seqs is not None:
        command += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.tool_call_parser:
        if args.enable_auto_tool_choice:
            command.append("--enable-auto-tool-choice")
        command += ["--tool-call-parser", args.tool_call_parser]
    if args.reasoning_parser:
        command += ["--reasoning-parser", args.reasoning_parser]
    command += args.extra_args
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    secret_env: dict[str, SecretEnv] = {}
    cache: CacheVolume | None = None
    if local and (args.hf_token_secret or args.model_cache_claim):
        raise EngineArgsError(
            "hf_token_secret and model_cache_claim name Kubernetes objects; a local replica "
            "serves the stored files and needs neither"
        )
    if args.hf_token_secret:
        secret_env["HF_TOKEN"] = SecretEnv(
            secret=args.hf_token_secret, key=args.hf_token_secret_key
        )
    if args.model_cache_claim:
        cache = CacheVolume(claim=args.model_cache_claim, mount_path=CACHE_MOUNT_PATH)
        env["HF_HOME"] = CACHE_MOUNT_PATH
    return LaunchSpec(
        engine=EngineKind.VLLM,
        served_model_name=request.served_model_name,
        command=command,
        # No usage reports to vLLM's servers from tenants' replicas.
        env=env,
        secret_env=secret_env,
        cache_volume=cache,
        health_path="/health",
        metrics_path="/metrics",
        image=None if local else args.image,
        resources=Resources(
            cpu=args.cpu, memory_mb=_memory_mb(args, model), gpus=args.tensor_parallel_size
        ),
        model_files=model.files if local else None,
        startup_timeout_s=args.startup_timeout_s,
        probe_path="/v1/completions",
        probe_body={"model": request.served_model_name, "prompt": "ping", "max_tokens": 1},
    )


ENGINE = Engine(
    kind=EngineKind.VLLM,
    args=VllmArgs,
    render=render,
    needs_model=True,
    description="vLLM's OpenAI-compatible server on GPUs (Hugging Face models on Kubernetes)",
)
