"""Request and response bodies of the endpoints API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from control_plane.core.pagination import Page
from control_plane.endpoints.tables import Endpoint, EndpointReplica, ScalingEvent
from control_plane.identity.schemas import NO_NUL_PATTERN
from workflows.contracts.autoscale import MAX_WINDOW_S, AutoscalePolicy
from workflows.contracts.common import _not_a_bool
from workflows.contracts.endpoints import (
    EndpointStatus,
    EngineKind,
    ReplicaState,
    endpoint_workflow_id,
)

# Resource names on providers are `cp-ep-` + ..., and DNS labels stop at 63 characters.
NAME_PREFIX = "cp-ep-"
MAX_NAME = 63 - len(NAME_PREFIX)
EndpointName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NAME, pattern=r"^[a-z]([a-z0-9-]*[a-z0-9])?$"),
]

# Bounds inside the type: on an optional field they would sit beside `anyOf` in the
# JSON Schema, where clients (and fuzzers) ignore them.
# (The bool refusal goes after the bounds: before them, pydantic writes the bounds into
# the schema as unknown `ge`/`le` keywords.)
Replicas = Annotated[int, Field(ge=0, le=1000), BeforeValidator(_not_a_bool)]
ContextLength = Annotated[int, Field(ge=1, le=10_000_000), BeforeValidator(_not_a_bool)]
Seconds = Annotated[float, Field(ge=0, le=MAX_WINDOW_S, allow_inf_nan=False)]


class AutoscalePatch(BaseModel):
    """A partial policy: what is sent replaces those fields of the current one. A merged
    policy that contradicts itself (min above max) is a 409 naming the conflict."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: Replicas | None = None
    max_replicas: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_not_a_bool)] | None = None
    target_concurrency_per_replica: (
        Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] | None
    ) = None
    scale_up_window_s: Seconds | None = None
    scale_up_max_step: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_not_a_bool)] | None = (
        None
    )
    scale_down_stabilization_s: Seconds | None = None
    scale_to_zero_after_s: (
        Annotated[float, Field(gt=0, le=MAX_WINDOW_S, allow_inf_nan=False)] | None
    ) = None


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project_id: uuid.UUID
    name: EndpointName = Field(
        description="DNS-safe (lowercase letters, digits, '-'), unique in the project; "
        "clients send it as `model`."
    )
    description: Annotated[str, StringConstraints(max_length=2000, pattern=NO_NUL_PATTERN)] = ""
    model_id: uuid.UUID | None = Field(
        default=None,
        description="A `ready` model of the project or tenant; optional for the simulator.",
    )
    cluster_id: uuid.UUID | None = Field(
        default=None, description="Where to run; empty: the best-fitting cluster."
    )
    engine: EngineKind = EngineKind.SIMULATOR
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Engine settings; unknown keys are refused."
    )
    context_length: ContextLength | None = None
    replicas: Replicas | None = Field(
        default=None,
        description="Initial replicas; default: the autoscale minimum (at least 1).",
    )
    autoscale: AutoscalePolicy | None = Field(
        default=None, description="Default: a fixed `replicas` (min = max)."
    )
    reconcile_interval_s: float = Field(default=10.0, ge=0.2, le=3600)


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: Replicas | None = Field(description="Pin the replica count; null hands control back.")


class ReplicaRead(BaseModel):
    name: str
    state: ReplicaState
    url: str | None
    node: str | None
    pid: int | None
    port: int | None
    started_at: datetime | None
    restarts: int
    reason: str
    load: float
    observed_at: datetime

    @classmethod
    def of(cls, row: EndpointReplica) -> ReplicaRead:
        return cls(
            name=row.name,
            state=ReplicaState(row.state),
            url=row.url,
            node=row.node,
            pid=row.pid,
            port=row.port,
            started_at=row.started_at,
            restarts=row.restarts,
            reason=row.reason,
            load=row.load,
            observed_at=row.observed_at,
        )


class ScalingEventRead(BaseModel):
    time: datetime
    from_replicas: int
    to_replicas: int
    reason: str
    metric: float
    trigger: str

    @classmethod
    def of(cls, row: ScalingEvent) -> ScalingEventRead:
        return cls(
            time=row.time,
            from_replicas=row.from_replicas,
            to_replicas=row.to_replicas,
            reason=row.reason,
            metric=row.metric,
            trigger=row.trigger,
        )


class EndpointRead(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    model_id: uuid.UUID | None
    cluster_id: uuid.UUID | None
    engine: EngineKind
    engine_args: dict[str, Any]
    context_length: int | None
    status: EndpointStatus
    status_reason: str
    autoscale: AutoscalePolicy
    replicas_desired: int
    replicas_ready: int
    manual_replicas: int | None
    published: bool
    last_load: float
    workflow_id: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Endpoint) -> EndpointRead:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            project_id=row.project_id,
            name=row.name,
            description=row.description,
            model_id=row.model_id,
            cluster_id=row.cluster_id,
            engine=EngineKind(row.engine),
            engine_args=row.engine_args,
            context_length=row.context_length,
            status=EndpointStatus(row.status),
            status_reason=row.status_reason,
            autoscale=AutoscalePolicy.model_validate(row.autoscale),
            replicas_desired=row.replicas_desired,
            replicas_ready=row.replicas_ready,
            manual_replicas=row.manual_replicas,
            published=row.published,
            last_load=row.last_load,
            workflow_id=endpoint_workflow_id(row.id),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class EndpointDetail(EndpointRead):
    replicas: list[ReplicaRead]
    scaling_events: list[ScalingEventRead] = Field(description="The latest, newest first")


class EndpointList(Page[EndpointRead]):
    pass


class EndpointLogs(BaseModel):
    # Replica name -> its last lines.
    replicas: dict[str, str]
