"""Workflow runs: list from PostgreSQL, live progress from Temporal, cancel, stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from control_plane.audit import service as audit
from control_plane.core import temporal
from control_plane.core.db import session_scope
from control_plane.core.errors import Conflict, DependencyUnavailable, NotFound
from control_plane.core.logging import get_logger
from control_plane.identity.permissions import Principal, authorize
from control_plane.workflow_runs.repository import SORTABLE, WorkflowRunRepository
from control_plane.workflow_runs.schemas import (
    WorkflowRunDetail,
    WorkflowRunFilters,
    WorkflowRunList,
    WorkflowRunRead,
)
from control_plane.workflow_runs.tables import WorkflowRun
from workflows.contracts.common import PROGRESS_QUERY, Progress, ResourceRef, RunRecord, RunStatus

log = get_logger(__name__)

QUERY_TIMEOUT = timedelta(seconds=3)


class WorkflowRunService:
    def __init__(self, session: AsyncSession, client: Client) -> None:
        self.repo = WorkflowRunRepository(session)
        self.client = client

    async def record_started(
        self, handle: WorkflowHandle[Any, Any], kind: str, resource: ResourceRef
    ) -> None:
        """Row for a run the API just started, so it is listed before its first activity."""
        description = await handle.describe()
        await self.repo.upsert(
            RunRecord(
                workflow_id=handle.id,
                run_id=description.run_id,
                kind=kind,
                resource=resource,
                status=RunStatus.RUNNING,
                progress=Progress(),
                started_at=description.start_time,
            )
        )

    async def list(
        self,
        principal: Principal,
        filters: WorkflowRunFilters,
        *,
        page: int = 1,
        limit: int = 50,
        sort: str = "started_at",
        descending: bool = True,
    ) -> WorkflowRunList:
        if sort not in SORTABLE:
            raise ValueError(f"sort must be one of {sorted(SORTABLE)}")
        authorize(principal, "workflows:read", tenant_id=principal.tenant_id)
        filters = filters.model_copy(
            update={
                "tenant_id": principal.tenant_id,
                "visible_projects": principal.visible_projects(),
            }
        )
        rows, total = await self.repo.list(
            filters, page=page, limit=limit, sort=sort, descending=descending
        )
        return WorkflowRunList(
            items=[WorkflowRunRead.model_validate(r) for r in rows],
            total=total,
            page=page,
            limit=limit,
        )

    async def require(
        self, principal: Principal, workflow_id: str, scope: str = "workflows:read"
    ) -> WorkflowRun:
        row = await self.repo.get(workflow_id)
        if row is None or row.tenant_id is None:
            raise NotFound(f"workflow {workflow_id} not found")
        if row.project_id is None:
            # Tenant-level runs (system checks, cluster operations) are for tenant admins.
            if not principal.is_tenant_admin or row.tenant_id != principal.tenant_id:
                raise NotFound(f"workflow {workflow_id} not found")
            return row
        authorize(
            principal,
            scope,
            tenant_id=row.tenant_id,
            project_id=row.project_id,
            what=f"workflow {workflow_id}",
        )
        return row

    async def get(self, principal: Principal, workflow_id: str) -> WorkflowRunDetail:
        row = await self.require(principal, workflow_id)
        status, progress = await self.live_state(row)
        if status is not None and status.finished and row.status == RunStatus.RUNNING.value:
            await self.repo.mark_finished(workflow_id, status, None, None)
            row = await self.require(principal, workflow_id)
        read = WorkflowRunRead.model_validate(row)
        data = read.model_dump()
        if progress is not None:
            data["progress"] = progress
            data["status"] = status
        return WorkflowRunDetail(
            **data, progress_source="live" if progress is not None else "recorded"
        )

    async def live_state(self, row: WorkflowRun) -> tuple[RunStatus | None, Progress | None]:
        """Status from Temporal and progress from the workflow's query; None when unknown."""
        handle = self.client.get_workflow_handle(row.workflow_id)
        try:
            description: WorkflowExecutionDescription = await handle.describe(
                rpc_timeout=QUERY_TIMEOUT
            )
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND:
                log.warning("workflow_runs.describe_failed", workflow_id=row.workflow_id)
            return None, None
        status = temporal.STATUS_MAP.get(description.status) if description.status else None
        if status is not RunStatus.RUNNING:
            return status, None
        try:
            progress = await handle.query(
                PROGRESS_QUERY, result_type=Progress, rpc_timeout=QUERY_TIMEOUT
            )
        except Exception as err:  # a workflow without a worker cannot answer queries
            log.info("workflow_runs.query_failed", workflow_id=row.workflow_id, error=str(err))
            return status, None
        return status, progress

    async def cancel(self, principal: Principal, workflow_id: str) -> WorkflowRunDetail:
        row = await self.require(principal, workflow_id, "workflows:write")
        status, _ = await self.live_state(row)
        if status is None:
            raise DependencyUnavailable(
                f"cannot reach Temporal to cancel {workflow_id}", dependency="temporal"
            )
        if status.finished:
            raise Conflict(f"workflow {workflow_id} already finished ({status.value})")
        try:
            await self.client.get_workflow_handle(workflow_id).cancel()
        except RPCError as err:
            raise temporal.rpc_error(err) from err
        await audit.record(
            self.repo.session,
            actor=principal,
            action="workflow.cancel",
            resource_kind="workflow",
            resource_id=workflow_id,
            tenant_id=row.tenant_id,
            project_id=row.project_id,
        )
        return await self.get(principal, workflow_id)


async def stream_events(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    principal: Principal,
    workflow_id: str,
    poll_seconds: float,
) -> AsyncIterator[dict[str, Any]]:
    """Progress snapshots whenever they change, then one final `end` event.

    Each poll uses a short session of its own: a stream may last hours and must not pin a
    database connection.
    """
    last: dict[str, Any] | None = None
    while True:
        async with session_scope(sessions) as session:
            detail = await WorkflowRunService(session, client).get(principal, workflow_id)
        snapshot = detail.progress.model_dump(mode="json", exclude={"updated_at"})
        if snapshot != last:
            last = snapshot
            yield {"event": "progress", "data": detail.progress.model_dump(mode="json")}
        if detail.status.finished:
            yield {"event": "end", "data": {"status": detail.status.value, "error": detail.error}}
            return
        await asyncio.sleep(poll_seconds)
