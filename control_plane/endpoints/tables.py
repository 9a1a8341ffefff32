"""Endpoints (a model served by replicas on a cluster), their replicas as last observed,
and every scaling decision.

The `DeployEndpoint` workflow owns an endpoint's life and mirrors what it sees into these
rows, so lists and the gateway read PostgreSQL, never Temporal. Replica rows are
observations, not resources: the workflow replaces an endpoint's set on every save, so
they always say what exists now. Scaling events are append-only history.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class Endpoint(TableBase, table=True):
    __tablename__ = "endpoint"
    __table_args__ = (
        Index(
            "uq_endpoint_live_name",
            "project_id",
            "name",
            unique=True,
            postgresql_where=text("status <> 'deleted'"),
        ),
    )

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    project_id: uuid.UUID = Field(foreign_key="project.id", index=True)
    name: str = Field(max_length=63)
    description: str = Field(default="", max_length=2000)
    model_id: uuid.UUID | None = Field(default=None, foreign_key="model.id", index=True)
    # As asked (None: the recommendation) and then as placed.
    requested_cluster_id: uuid.UUID | None = Field(default=None, foreign_key="cluster.id")
    cluster_id: uuid.UUID | None = Field(default=None, foreign_key="cluster.id", index=True)
    engine: str = Field(max_length=32)
    engine_args: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    context_length: int | None = None
    status: str = Field(default="pending", max_length=16, index=True)
    status_reason: str = Field(default="", max_length=2000)
    # AutoscalePolicy; the workflow's copy wins while it runs, this one is its mirror.
    autoscale: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    replicas_desired: int = 0
    replicas_ready: int = 0
    # Set by a manual `scale`; None when autoscaling decides.
    manual_replicas: int | None = None
    # The rendered LaunchSpec (what every replica runs).
    launch_spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    # In the routing table: the gateway sends traffic to its ready replicas.
    published: bool = False
    published_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    # Bumped on every change the gateway must see (replica set, publication, status).
    routing_version: int = 0
    last_load: float = 0.0
    created_by: uuid.UUID | None = Field(default=None, foreign_key="user_account.id")


class EndpointReplica(TableBase, table=True):
    __tablename__ = "endpoint_replica"
    __table_args__ = (UniqueConstraint("endpoint_id", "name"),)

    endpoint_id: uuid.UUID = Field(foreign_key="endpoint.id", index=True)
    name: str = Field(max_length=255)
    state: str = Field(max_length=16)
    url: str | None = Field(default=None, max_length=512)
    node: str | None = Field(default=None, max_length=255)
    pid: int | None = None
    port: int | None = None
    started_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    restarts: int = 0
    reason: str = Field(default="", max_length=2000)
    # Requests running + waiting at the last sample (the gateway's least-loaded pick).
    load: float = 0.0
    observed_at: datetime = Field(sa_type=DateTime(timezone=True))


class ScalingEvent(TableBase, table=True):
    __tablename__ = "scaling_event"
    __table_args__ = (Index("ix_scaling_event_endpoint_time", "endpoint_id", "time"),)

    endpoint_id: uuid.UUID = Field(foreign_key="endpoint.id")
    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    project_id: uuid.UUID = Field(foreign_key="project.id", index=True)
    time: datetime = Field(sa_type=DateTime(timezone=True))
    from_replicas: int
    to_replicas: int
    reason: str = Field(max_length=2000)
    metric: float = 0.0
    # autoscale | manual | wake | reconcile
    trigger: str = Field(max_length=16)
