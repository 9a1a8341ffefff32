"""The audit log (tenant admins)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import select

from api.deps import SessionDep, TenantAdmin
from api.errors import problems
from control_plane.audit.schemas import AuditEventRead
from control_plane.audit.tables import AuditEvent
from control_plane.core.pagination import Page, paginate
from control_plane.identity.schemas import NO_NUL_PATTERN

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEventRead], responses=problems(401, 403))
async def list_audit_events(
    principal: TenantAdmin,
    session: SessionDep,
    action: Annotated[str | None, Query(max_length=64, pattern=NO_NUL_PATTERN)] = None,
    resource_kind: Annotated[str | None, Query(max_length=64, pattern=NO_NUL_PATTERN)] = None,
    project_id: uuid.UUID | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Page[AuditEventRead]:
    """Events of the caller's tenant, newest first."""
    query = select(AuditEvent).where(AuditEvent.tenant_id == principal.tenant_id)
    if action:
        query = query.where(AuditEvent.action == action)
    if resource_kind:
        query = query.where(AuditEvent.resource_kind == resource_kind)
    if project_id:
        query = query.where(AuditEvent.project_id == project_id)
    return await paginate(
        session,
        query,
        AuditEvent,
        AuditEventRead,
        page=page,
        limit=limit,
        sort="seq",
        descending=True,
    )
