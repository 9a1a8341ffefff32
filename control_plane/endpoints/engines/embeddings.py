"""The `embeddings` engine: replicas run the built-in embeddings server
(`control_plane.endpoints.engines.embeddings_server`), a sentence-transformers model
on the CPU behind an OpenAI-compatible `/v1/embeddings`.

On a local cluster the model's stored files are put under `{model_dir}` before the
replica starts. Pods on Kubernetes get no such copy, so there `model_dir` must name
where the files are inside the container (baked into the image or on a volume).
"""

from __future__ import annotations

import math

from pydantic import Field

from control_plane.endpoints.engines.base import (
    Engine,
    EngineArgs,
    EngineArgsError,
    EngineRequest,
)
from workflows.contracts.clusters import ClusterKind
from workflows.contracts.common import Integer
from workflows.contracts.endpoints import (
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    PYTHON_PLACEHOLDER,
    EngineKind,
    LaunchSpec,
    Resources,
)

MODULE = "control_plane.endpoints.engines.embeddings_server"
# The `inference` target of docker/Dockerfile: the project image plus the `embeddings` extra.
DEFAULT_IMAGE = "control-plane-inference:latest"
# Modalities (see `control_plane.models.metadata`) a text embedding server cannot serve.
REFUSED_MODALITIES = frozenset({"audio"})
MIB = 1024 * 1024
# Python, torch and the tokenizer before any weights (MiniLM-L6 in all: about 600 MiB).
RUNTIME_MB = 1024
FALLBACK_MEMORY_MB = 2048


class EmbeddingsArgs(EngineArgs):
    max_batch_size: Integer = Field(default=64, ge=1, le=4096)
    max_batch_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    max_input_items: Integer = Field(default=2048, ge=1, le=100_000)
    # Torch threads; by default one per whole CPU the replica asks for (at least one),
    # since torch would otherwise start one per core of the node, limits or not.
    threads: Integer | None = Field(default=None, ge=1, le=1024)
    cpu: float = Field(default=2.0, gt=0, le=1024)
    # By default from the model's weights: see `_memory_mb`.
    memory_mb: Integer | None = Field(default=None, ge=256, le=16_777_216)
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    # Kubernetes only: the model's directory inside the container.
    model_dir: str | None = Field(default=None, min_length=1, max_length=4096)


def _memory_mb(request: EngineRequest, args: EmbeddingsArgs) -> int:
    if args.memory_mb is not None:
        return args.memory_mb
    weights = request.model.weights_bytes if request.model else None
    if not weights:
        return FALLBACK_MEMORY_MB
    # Twice the weights: a half-precision checkpoint doubles once loaded as float32.
    return RUNTIME_MB + math.ceil(2 * weights / MIB)


def render(request: EngineRequest, args: EmbeddingsArgs) -> LaunchSpec:
    model = request.model
    if model is not None and model.modality in REFUSED_MODALITIES:
        raise EngineArgsError(
            f"model {model.name!r} is an {model.modality} model; the embeddings engine embeds text"
        )
    local = request.cluster_kind is ClusterKind.LOCAL
    if local:
        model_dir = MODEL_DIR_PLACEHOLDER
    elif args.model_dir is not None:
        model_dir = args.model_dir
    else:
        raise EngineArgsError(
            "the embeddings engine on Kubernetes needs engine_args.model_dir: the model's "
            "directory inside the container (pods get no copy of the stored files)"
        )
    threads = args.threads if args.threads is not None else max(1, math.floor(args.cpu))
    command = [
        PYTHON_PLACEHOLDER if local else "python",
        "-m",
        MODULE,
        "--host",
        "127.0.0.1" if local else "0.0.0.0",
        "--port",
        PORT_PLACEHOLDER,
        "--model-dir",
        model_dir,
        "--served-model-name",
        request.served_model_name,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-wait-ms",
        str(args.max_batch_wait_ms),
        "--max-input-items",
        str(args.max_input_items),
        "--threads",
        str(threads),
    ]
    if not local:
        command.append("--json-logs")
    return LaunchSpec(
        engine=EngineKind.EMBEDDINGS,
        served_model_name=request.served_model_name,
        command=command,
        # The model comes from the directory only, never from a hub.
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        image=None if local else args.image,
        resources=Resources(cpu=args.cpu, memory_mb=_memory_mb(request, args)),
        model_files=model.files if model is not None else None,
        startup_timeout_s=180.0,
        probe_path="/v1/embeddings",
        probe_body={"model": request.served_model_name, "input": "ping"},
    )


ENGINE = Engine(
    kind=EngineKind.EMBEDDINGS,
    args=EmbeddingsArgs,
    render=render,
    needs_model=True,
    description="sentence-transformers embeddings on the CPU behind an OpenAI-compatible API",
)
