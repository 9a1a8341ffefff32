"""The `transformers` engine: replicas run the built-in chat server
(`control_plane.endpoints.engines.transformers_server`), a causal language model loaded
with Hugging Face `transformers` on the CPU behind OpenAI-compatible chat and completions.

It is for small models on machines without an accelerator: generation is serial by
default (`max_concurrency` 1) and runs at a few tokens to a few tens of tokens a second.
The model is a Hugging Face checkpoint or a GGUF file, which `transformers` dequantizes
to float32 (or bfloat16) on load, so memory is sized from the dequantized weights.

As with the embeddings engine, a local replica serves the files the deploy copied under
`{model_dir}`, and a pod on Kubernetes needs `model_dir`: where the files are inside the
container.
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
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    PYTHON_PLACEHOLDER,
    EngineKind,
    LaunchSpec,
    Resources,
)

MODULE = "control_plane.endpoints.engines.transformers_server"
# The project image's `inference` target: CPU torch and transformers (docker/Dockerfile).
DEFAULT_IMAGE = "control-plane-inference:latest"
# Loading dequantizes every tensor on the CPU: tens of seconds for a 135M-parameter GGUF.
DEFAULT_STARTUP_TIMEOUT_S = 300.0
MIB = 1024 * 1024
# Python, torch and transformers before any weights.
RUNTIME_MB = 1024
FALLBACK_MEMORY_MB = 4096
# Bytes per weight once loaded, over bytes per weight as stored. Checkpoints are mostly
# 16-bit; GGUF files mostly hold 4- to 5-bit blocks (Q4_0 and Q4_K_M: about 4.5 bits a
# weight), so a GGUF grows about sevenfold when dequantized to float32.
CHECKPOINT_EXPANSION = {"float32": 2.0, "bfloat16": 1.0}
GGUF_EXPANSION = {"float32": 32 / 4.5, "bfloat16": 16 / 4.5}
# While a GGUF loads, its dequantized tensors and the model's exist at once (measured:
# a peak of 1.7 times the loaded model).
GGUF_LOAD_PEAK = 2.0
# The model metadata sizes the KV cache at 2 bytes an element.
KV_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}
# Architectures with heads that classify, fill masks or embed: not text generators.
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class TransformersArgs(EngineArgs):
    # Torch threads; by default one per whole CPU the replica asks for (at least one).
    threads: Integer | None = Field(default=None, ge=1, le=1024)
    cpu: float = Field(default=2.0, gt=0, le=1024)
    # By default from the model's weights and context: see `_memory_mb`.
    memory_mb: Integer | None = Field(default=None, ge=512, le=16_777_216)
    # float32 is fast on every CPU; bfloat16 halves the memory, fast only on CPUs with
    # bfloat16 instructions.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Sequences generated at once; more share the same cores, so one is the default.
    max_concurrency: Integer = Field(default=1, ge=1, le=256)
    # Requests waiting for a slot before new ones get 429.
    max_queue: Integer = Field(default=16, ge=0, le=100_000)
    # Tokens generated when a request sets no `max_tokens`, and the most it may set.
    default_max_tokens: Integer = Field(default=256, ge=1, le=1_000_000)
    max_tokens_limit: Integer = Field(default=4096, ge=1, le=1_000_000)
    # Prompt plus output; default: the endpoint's context length, else the model's.
    max_model_len: Integer | None = Field(default=None, ge=16, le=100_000_000)
    # Which GGUF file of the model directory to load (a relative path); by default the
    # only `.gguf` file at its top, and the directory as a checkpoint when there is none.
    gguf_file: str | None = Field(default=None, min_length=6, max_length=1024)
    startup_timeout_s: float = Field(default=DEFAULT_STARTUP_TIMEOUT_S, ge=30, le=86_400)
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    # Kubernetes only: the model's directory inside the container.
    model_dir: str | None = Field(default=None, min_length=1, max_length=4096)

    @field_validator("gguf_file")
    @classmethod
    def _relative_gguf_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.split("/")
        if (
            not value.lower().endswith(".gguf")
            or value.startswith("/")
            or any(part in ("", ".", "..") for part in parts)
            or any(ord(c) < 32 or c == "\\" for c in value)
        ):
            raise ValueError(
                "must be a relative path to a .gguf file inside the model directory, "
                "without '..', backslashes or control characters"
            )
        return value

    @model_validator(mode="after")
    def _default_within_limit(self) -> Self:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        return self


def _refuse_non_generative(model: ModelInfo) -> None:
    if model.modality not in (None, "text"):
        raise EngineArgsError(
            f"model {model.name!r} is an {model.modality} model; the transformers engine "
            "serves text-only language models"
        )
    architecture = model.architecture
    if architecture is None or architecture.endswith(GENERATIVE_SUFFIXES):
        return
    # A class name whose head is not a language-model head (`BertModel`,
    # `...ForSequenceClassification`, `T5ForConditionalGeneration`), or a GGUF
    # architecture of the BERT family: encoders.
    is_class = "For" in architecture or architecture.endswith("Model")
    if is_class or "bert" in architecture.lower():
        raise EngineArgsError(
            f"model {model.name!r} ({architecture}) does not generate text; the transformers "
            "engine serves causal language models"
        )


def _gguf_file(args: TransformersArgs, model: ModelInfo) -> str | None:
    """The GGUF file the server will load, when the model's file listing says, or None
    for a checkpoint. The server applies the same rule to the directory it is given."""
    files = model.files.files if model.files is not None else []
    paths = {file.path for file in files}
    if args.gguf_file is not None:
        if paths and args.gguf_file not in paths:
            raise EngineArgsError(f"model {model.name!r} has no file {args.gguf_file!r}")
        return args.gguf_file
    top_level = sorted(p for p in paths if "/" not in p and p.lower().endswith(".gguf"))
    if len(top_level) == 1:
        return top_level[0]
    if len(top_level) > 1 and "config.json" not in paths:
        raise EngineArgsError(
            f"model {model.name!r} has {len(top_level)} GGUF files; name the one to serve "
            f"with engine_args.gguf_file ({', '.join(top_level[:5])})"
        )
    return None


def _max_model_len(request: EngineRequest, args: TransformersArgs, model: ModelInfo) -> int | None:
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


def _memory_mb(
    args: TransformersArgs, model: ModelInfo, gguf: bool, max_model_len: int | None
) -> int:
    if args.memory_mb is not None:
        return args.memory_mb
    if not model.weights_bytes:
        return FALLBACK_MEMORY_MB
    if gguf:
        weights = model.weights_bytes * GGUF_EXPANSION[args.dtype] * GGUF_LOAD_PEAK
    else:
        weights = model.weights_bytes * CHECKPOINT_EXPANSION[args.dtype]
    kv_cache = 0.0
    if model.kv_cache_bytes_per_token and max_model_len:
        per_token = model.kv_cache_bytes_per_token * KV_ELEMENT_BYTES[args.dtype] / 2
        kv_cache = per_token * max_model_len * args.max_concurrency
    return min(16_777_216, RUNTIME_MB + math.ceil((weights + kv_cache) / MIB))


def render(request: EngineRequest, args: TransformersArgs) -> LaunchSpec:
    model = request.model
    if model is None:
        raise EngineArgsError("the transformers engine needs a model")
    _refuse_non_generative(model)
    local = request.cluster_kind is ClusterKind.LOCAL
    if local:
        model_dir = MODEL_DIR_PLACEHOLDER
    elif args.model_dir is not None:
        model_dir = args.model_dir
    else:
        raise EngineArgsError(
            "the transformers engine on Kubernetes needs engine_args.model_dir: the model's "
            "directory inside the container (pods get no copy of the stored files)"
        )
    gguf_file = _gguf_file(args, model)
    max_model_len = _max_model_len(request, args, model)
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
        "--dtype",
        args.dtype,
        "--threads",
        str(threads),
        "--max-concurrency",
        str(args.max_concurrency),
        "--max-queue",
        str(args.max_queue),
        "--default-max-tokens",
        str(args.default_max_tokens),
        "--max-tokens-limit",
        str(args.max_tokens_limit),
    ]
    # Only a file the user named: otherwise the server finds it in the directory it is
    # given, by the rule `_gguf_file` applies to the stored listing.
    if args.gguf_file is not None:
        command += ["--gguf-file", args.gguf_file]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if not local:
        command.append("--json-logs")
    return LaunchSpec(
        engine=EngineKind.TRANSFORMERS,
        served_model_name=request.served_model_name,
        command=command,
        # The model comes from the directory only, never from a hub; and no progress bar
        # (GGUF dequantization draws one) in the replica's log.
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"},
        image=None if local else args.image,
        resources=Resources(
            cpu=args.cpu,
            memory_mb=_memory_mb(args, model, gguf_file is not None, max_model_len),
        ),
        model_files=model.files if local else None,
        startup_timeout_s=args.startup_timeout_s,
        # A completion rather than a chat: a base model without a chat template serves
        # completions only, and must still come up.
        probe_path="/v1/completions",
        probe_body={"model": request.served_model_name, "prompt": "ping", "max_tokens": 1},
    )


ENGINE = Engine(
    kind=EngineKind.TRANSFORMERS,
    args=TransformersArgs,
    render=render,
    needs_model=True,
    description="Hugging Face transformers (checkpoints or GGUF) on the CPU behind an "
    "OpenAI-compatible chat and completions API, with vLLM metrics",
)
