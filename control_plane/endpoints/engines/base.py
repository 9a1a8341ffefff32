"""What every engine shares: the inputs it renders a launch spec from, and the registry.

An engine is a module with an `Args` model (the `engine_args` a user may set, unknown
keys refused) and `render(request, args) -> LaunchSpec`. The API validates `engine_args`
with `parse_args` when an endpoint is created, so a typo is a 422, not a replica that
never starts; the deploy activity renders the spec with the same function.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from workflows.contracts.clusters import ClusterKind
from workflows.contracts.endpoints import EngineKind, LaunchSpec, ModelFiles


class EngineArgsError(ValueError):
    """`engine_args` that the engine refuses; the message says which and why."""


class EngineArgs(BaseModel):
    """Base of every engine's arguments: a typo in a key is an error."""

    model_config = ConfigDict(extra="forbid")


class ModelInfo(BaseModel):
    """What engines may know of the model an endpoint serves."""

    model_id: uuid.UUID
    name: str
    source_kind: str
    source_ref: str
    pinned_revision: str | None = None
    architecture: str | None = None
    context_length: int | None = None
    # Bytes of the weights and of the KV cache per token, from the model's metadata.
    weights_bytes: int | None = None
    kv_cache_bytes_per_token: int | None = None
    modality: str | None = None
    # One replica's memory (weights + KV cache for the context), when the metadata says.
    memory_mb: int | None = None
    files: ModelFiles | None = None


class EngineRequest(BaseModel):
    engine: EngineKind
    # The name clients send as `model` (the endpoint's name).
    served_model_name: str
    cluster_kind: ClusterKind
    model: ModelInfo | None = None
    # Requested context length (tokens); engines derive limits from it and the model.
    context_length: int | None = None


@dataclass(frozen=True)
class Engine:
    kind: EngineKind
    args: type[EngineArgs]
    render: Callable[[EngineRequest, Any], LaunchSpec]
    # Does a replica need a stored model (embeddings, vllm, transformers) or not (simulator)?
    needs_model: bool
    description: str


def _registry() -> dict[EngineKind, Engine]:
    # Imported here, not at the top: engine modules import this one for `EngineArgs`.
    from control_plane.endpoints.engines import (
        embeddings,
        simulator_engine,
        transformers_engine,
        vllm,
    )

    engines = [simulator_engine.ENGINE, embeddings.ENGINE, vllm.ENGINE, transformers_engine.ENGINE]
    return {engine.kind: engine for engine in engines}


def engine_for(kind: EngineKind) -> Engine:
    return _registry()[kind]


def parse_args(kind: EngineKind, raw: dict[str, Any]) -> EngineArgs:
    engine = engine_for(kind)
    try:
        return engine.args.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'engine_args'}: {e['msg']}"
            for e in err.errors()
        )
        raise EngineArgsError(f"invalid engine_args for {kind.value}: {problems}") from None


def render(request: EngineRequest, raw_args: dict[str, Any]) -> LaunchSpec:
    engine = engine_for(request.engine)
    if engine.needs_model and request.model is None:
        raise EngineArgsError(f"the {request.engine.value} engine needs a model")
    return engine.render(request, parse_args(request.engine, raw_args))
