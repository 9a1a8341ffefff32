from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class WorkflowRun(TableBase, table=True):
    """One row per workflow id; holds its latest run (continue-as-new moves `run_id`)."""

    __tablename__ = "workflow_run"
    __table_args__ = (
        Index("ix_workflow_run_resource", "resource_kind", "resource_id"),
        Index("ix_workflow_run_started_at", "started_at"),
    )

    workflow_id: str = Field(max_length=255, unique=True)
    run_id: str = Field(max_length=64)
    kind: str = Field(max_length=128, index=True)
    resource_kind: str = Field(max_length=64)
    resource_id: str | None = Field(default=None, max_length=255)
    # No foreign keys: a run's record outlives what it acted on.
    tenant_id: uuid.UUID | None = Field(default=None, index=True)
    project_id: uuid.UUID | None = Field(default=None, index=True)
    status: str = Field(max_length=32, index=True)
    progress: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    error: str | None = None
    started_at: datetime = Field(sa_type=DateTime(timezone=True))
    finished_at: datetime | None = Field(
        default=None,
        sa_type=DateTime(timezone=True),
    )
