"""Routers: a project's named rule for spreading requests over endpoints and cloud models.

The gateway resolves a request's `model` to a router (or an endpoint) of the caller's
project and applies the router's strategy, limits, retries, fallbacks and cooldowns; it
reads these rows when a change notice names one (`control_plane.routing.changes`), never
per request. `targets`, `fallbacks` and `cooldown` hold the JSON of `RouterTarget`,
`RouterFallback` and `CooldownSettings` (`control_plane.routing.schemas`), validated by
the API before they are stored.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class Router(TableBase, table=True):
    __tablename__ = "router"
    __table_args__ = (
        # A deleted router frees its name at once.
        Index(
            "uq_router_live_name",
            "project_id",
            "name",
            unique=True,
            postgresql_where=text("status <> 'deleted'"),
        ),
    )

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    project_id: uuid.UUID = Field(foreign_key="project.id", index=True)
    # Shares the project's namespace with endpoint names: clients send either as `model`.
    name: str = Field(max_length=63)
    description: str = Field(default="", max_length=2000)
    strategy: str = Field(default="weighted", max_length=32)
    # [{endpoint_id | model_id, weight, rpm, tpm}], in the order given.
    targets: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONB)
    # [{router_id | endpoint_id | model_id}], tried in this order once the targets fail.
    fallbacks: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONB)
    retries: int = 2
    retry_backoff_s: float = 0.1
    # Per upstream attempt.
    timeout_s: float = 600.0
    # {allowed_fails, window_s, cooldown_s}
    cooldown: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    status: str = Field(default="active", max_length=16, index=True)
    deleted_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    created_by: uuid.UUID | None = Field(default=None, foreign_key="user_account.id")
