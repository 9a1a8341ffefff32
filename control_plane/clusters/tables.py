"""Clusters, their nodes and accelerators, and each cluster's status history.

Nodes and accelerators are the inventory of the last successful discovery. A node that
disappears from the cluster is kept with status `removed` (its history stays readable);
accelerator rows are replaced per node at each discovery, they carry no history.
Capacity totals and free capacity are rolled up onto the cluster row when the inventory
is saved, so lists and placement read one row per cluster.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase

# Statuses in which a cluster no longer holds its name or its API server.
RELEASED_STATUSES = ("deleted", "failed")


class Cluster(TableBase, table=True):
    __tablename__ = "cluster"
    __table_args__ = (
        Index(
            "uq_cluster_live_name",
            "tenant_id",
            "name",
            unique=True,
            postgresql_where=text("status <> 'deleted'"),
        ),
        # The same API server onboarded twice in a tenant would be watched and placed on
        # twice; a failed or deleted onboarding frees it.
        Index(
            "uq_cluster_live_server",
            "tenant_id",
            "server_url",
            unique=True,
            postgresql_where=text("status NOT IN ('deleted', 'failed')"),
        ),
    )

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    name: str = Field(max_length=63)
    kind: str = Field(max_length=16)
    # A tenant-wide kubeconfig credential; None for `local` and in-cluster config.
    credential_id: uuid.UUID | None = Field(default=None, foreign_key="credential.id")
    server_url: str = Field(max_length=512)
    namespace: str = Field(max_length=63)
    status: str = Field(default="onboarding", max_length=16, index=True)
    status_reason: str = Field(default="", max_length=2000)
    last_seen_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    platform: str | None = Field(default=None, max_length=32)
    version: str | None = Field(default=None, max_length=255)
    # MonitorSettings: interval, failure threshold, connect attempts.
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    # Rolled up from ready nodes at each discovery.
    node_count: int = 0
    ready_node_count: int = 0
    cpu_cores: float = 0.0
    allocatable_cpu: float = 0.0
    memory_mb: int = 0
    allocatable_memory_mb: int = 0
    gpu_count: int = 0
    allocatable_gpus: int = 0
    gpu_memory_mb: int = 0
    created_by: uuid.UUID | None = Field(default=None, foreign_key="user_account.id")


class ClusterNode(TableBase, table=True):
    __tablename__ = "cluster_node"
    __table_args__ = (UniqueConstraint("cluster_id", "name"),)

    cluster_id: uuid.UUID = Field(foreign_key="cluster.id", index=True)
    name: str = Field(max_length=253)
    # ready | not_ready | removed
    status: str = Field(max_length=16)
    reason: str = Field(default="", max_length=2000)
    cpu_cores: float = 0.0
    allocatable_cpu: float = 0.0
    memory_mb: int = 0
    allocatable_memory_mb: int = 0
    labels: dict[str, str] = Field(default_factory=dict, sa_type=JSONB)
    last_seen_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class Accelerator(TableBase, table=True):
    __tablename__ = "accelerator"
    __table_args__ = (UniqueConstraint("node_id", "vendor", "model"),)

    node_id: uuid.UUID = Field(foreign_key="cluster_node.id", index=True)
    cluster_id: uuid.UUID = Field(foreign_key="cluster.id", index=True)
    vendor: str = Field(max_length=32)
    model: str = Field(max_length=255)
    memory_mb: int = 0
    count: int = 0
    allocatable: int = 0
    driver_version: str | None = Field(default=None, max_length=64)
    cuda_version: str | None = Field(default=None, max_length=64)


class ClusterEvent(TableBase, table=True):
    """One row per status change: the cluster's status history."""

    __tablename__ = "cluster_event"

    cluster_id: uuid.UUID = Field(foreign_key="cluster.id", index=True)
    status: str = Field(max_length=16)
    previous_status: str | None = Field(default=None, max_length=16)
    reason: str = Field(default="", max_length=2000)
