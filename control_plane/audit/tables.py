"""Append-only audit log, hash-chained so an edited or deleted row is detectable."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class AuditEvent(TableBase, table=True):
    __tablename__ = "audit_event"

    # Position in the chain, assigned under a transaction lock by the writer.
    seq: int = Field(sa_type=BigInteger, unique=True)
    tenant_id: uuid.UUID | None = Field(default=None, index=True)
    project_id: uuid.UUID | None = Field(default=None, index=True)
    actor_kind: str = Field(max_length=16)
    actor_id: str | None = Field(default=None, max_length=255)
    action: str = Field(max_length=64, index=True)
    resource_kind: str = Field(max_length=64)
    resource_id: str | None = Field(default=None, max_length=255)
    outcome: str = Field(max_length=16)
    request_id: str | None = Field(default=None, max_length=64)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    occurred_at: datetime = Field(sa_type=DateTime(timezone=True))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)
