"""Writes audit events in the caller's transaction and verifies the hash chain."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.audit.tables import AuditEvent
from control_plane.core.db import utcnow
from control_plane.identity.permissions import Principal

GENESIS = "0" * 64
# One chain for the whole installation: writers serialise on this transaction lock.
_CHAIN_LOCK = 0x43504155  # "CPAU"


def _digest(prev_hash: str, event: dict[str, Any]) -> str:
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def _hashed_fields(row: AuditEvent) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "tenant_id": str(row.tenant_id) if row.tenant_id else None,
        "project_id": str(row.project_id) if row.project_id else None,
        "actor_kind": row.actor_kind,
        "actor_id": row.actor_id,
        "action": row.action,
        "resource_kind": row.resource_kind,
        "resource_id": row.resource_id,
        "outcome": row.outcome,
        "request_id": row.request_id,
        "details": row.details,
        "occurred_at": row.occurred_at.isoformat(),
    }


async def record(
    session: AsyncSession,
    *,
    actor: Principal | None,
    action: str,
    resource_kind: str,
    resource_id: str | uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    project_id: uuid.UUID | None = None,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
    request_id: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """Append one event, in the same transaction as the change it describes."""
    from asgi_correlation_id import correlation_id

    await session.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=_CHAIN_LOCK))  # type: ignore[call-overload]
    last = (
        await session.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1))
    ).first()
    row = AuditEvent(
        seq=(last.seq + 1) if last else 1,
        tenant_id=tenant_id or (actor.tenant_id if actor else None),
        project_id=project_id,
        actor_kind=actor.kind if actor else "system",
        actor_id=actor.actor_id if actor else None,
        action=action,
        resource_kind=resource_kind,
        resource_id=str(resource_id) if resource_id else None,
        outcome=outcome,
        request_id=request_id or correlation_id.get(),
        details=details or {},
        occurred_at=occurred_at or utcnow(),
        prev_hash=last.hash if last else GENESIS,
        hash="",
    )
    row.hash = _digest(row.prev_hash, _hashed_fields(row))
    session.add(row)
    await session.flush()
    return row


@dataclass
class ChainReport:
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None


async def verify_chain(session: AsyncSession, *, batch: int = 1000) -> ChainReport:
    """Recompute every hash in order; report the first row that does not match."""
    prev_hash, expected_seq, checked = GENESIS, 1, 0
    total = (await session.exec(select(func.count()).select_from(AuditEvent))).one()
    while checked < total:
        rows = (
            await session.exec(
                select(AuditEvent)
                .where(col(AuditEvent.seq) >= expected_seq)
                .order_by(col(AuditEvent.seq))
                .limit(batch)
                .execution_options(populate_existing=True)
            )
        ).all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                return ChainReport(checked, expected_seq, f"row {expected_seq} is missing")
            if row.prev_hash != prev_hash:
                return ChainReport(checked, row.seq, "previous-hash link is broken")
            if _digest(prev_hash, _hashed_fields(row)) != row.hash:
                return ChainReport(checked, row.seq, "row content does not match its hash")
            prev_hash, expected_seq, checked = row.hash, expected_seq + 1, checked + 1
    return ChainReport(checked)
