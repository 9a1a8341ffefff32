from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, or_
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.db import utcnow
from control_plane.workflow_runs.schemas import WorkflowRunFilters
from control_plane.workflow_runs.tables import WorkflowRun
from workflows.contracts.common import RunRecord, RunStatus

SORTABLE = {"started_at", "finished_at", "updated_at", "kind", "status"}


class WorkflowRunRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def upsert(self, record: RunRecord) -> None:
        values: dict[str, Any] = {
            "workflow_id": record.workflow_id,
            "run_id": record.run_id,
            "kind": record.kind,
            "resource_kind": record.resource.kind,
            "resource_id": record.resource.id,
            "project_id": record.resource.project_id,
            "tenant_id": record.resource.tenant_id,
            "status": record.status.value,
            "progress": record.progress.model_dump(mode="json"),
            "error": record.error,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
        }
        stmt = insert(WorkflowRun).values(**values)
        table = WorkflowRun.__table__  # type: ignore[attr-defined]
        update: dict[str, Any] = {k: stmt.excluded[k] for k in values if k != "workflow_id"}
        update["updated_at"] = utcnow()
        # A run's owner, once known, is never forgotten by a later record without one.
        for owner in ("tenant_id", "project_id"):
            update[owner] = func.coalesce(stmt.excluded[owner], table.c[owner])
        # A retried, stale "running" record must never reopen a run already recorded as
        # finished; a new run (continue-as-new, re-run) always wins.
        stmt = stmt.on_conflict_do_update(
            index_elements=["workflow_id"],
            set_=update,
            where=or_(
                table.c.run_id != stmt.excluded.run_id,
                table.c.status == RunStatus.RUNNING.value,
                stmt.excluded.status != RunStatus.RUNNING.value,
            ),
        )
        await self.session.exec(stmt)

    async def get(self, workflow_id: str) -> WorkflowRun | None:
        result = await self.session.exec(
            select(WorkflowRun)
            .where(WorkflowRun.workflow_id == workflow_id)
            .execution_options(populate_existing=True)
        )
        return result.one_or_none()

    async def mark_finished(
        self, workflow_id: str, status: RunStatus, finished_at: datetime | None, error: str | None
    ) -> None:
        row = await self.get(workflow_id)
        if row is None or row.status != RunStatus.RUNNING.value:
            return
        row.status = status.value
        row.finished_at = finished_at or utcnow()
        row.error = row.error or error
        progress = dict(row.progress)
        progress["status"] = status.value
        row.progress = progress
        self.session.add(row)

    async def list(
        self, filters: WorkflowRunFilters, *, page: int, limit: int, sort: str, descending: bool
    ) -> tuple[list[WorkflowRun], int]:
        conditions: list[Any] = []
        if filters.kind:
            conditions.append(WorkflowRun.kind == filters.kind)
        if filters.status:
            conditions.append(WorkflowRun.status == filters.status.value)
        if filters.resource_kind:
            conditions.append(WorkflowRun.resource_kind == filters.resource_kind)
        if filters.resource_id:
            conditions.append(WorkflowRun.resource_id == filters.resource_id)
        if filters.project_id:
            conditions.append(WorkflowRun.project_id == filters.project_id)
        if filters.tenant_id:
            conditions.append(WorkflowRun.tenant_id == filters.tenant_id)
        if filters.visible_projects is not None:
            conditions.append(col(WorkflowRun.project_id).in_(filters.visible_projects))
        column = getattr(WorkflowRun, sort)
        order = column.desc() if descending else column.asc()
        total = (
            await self.session.exec(
                select(func.count()).select_from(WorkflowRun).where(*conditions)
            )
        ).one()
        rows = (
            await self.session.exec(
                select(WorkflowRun)
                .where(*conditions)
                .order_by(order, col(WorkflowRun.workflow_id))
                .offset((page - 1) * limit)
                .limit(limit)
            )
        ).all()
        return list(rows), int(total)
