"""Activities that mirror workflow state into PostgreSQL."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from control_plane.core.db import session_scope
from control_plane.workflow_runs.repository import WorkflowRunRepository
from workflows.contracts.common import RunRecord
from workflows.tracking import RECORD_RUN_ACTIVITY


class BookkeepingActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    @activity.defn(name=RECORD_RUN_ACTIVITY)
    async def record_workflow_run(self, record: RunRecord) -> None:
        async with session_scope(self.sessions) as session:
            await WorkflowRunRepository(session).upsert(record)
