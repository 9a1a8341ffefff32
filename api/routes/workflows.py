"""Workflow runs: list, inspect (live progress), cancel, and stream progress (SSE)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.deps import CurrentPrincipal, SessionDep, StateDep, TemporalDep, bearer
from api.errors import problems
from control_plane.core.db import session_scope
from control_plane.core.errors import Unauthenticated
from control_plane.identity.permissions import Principal
from control_plane.workflow_runs.schemas import (
    WorkflowRunDetail,
    WorkflowRunFilters,
    WorkflowRunList,
)
from control_plane.workflow_runs.service import WorkflowRunService, stream_events
from workflows.contracts.common import RunStatus

router = APIRouter(prefix="/api/v1/workflows", tags=["workflows"])

WorkflowId = Annotated[str, Path(min_length=1, max_length=255)]


@router.get("", response_model=WorkflowRunList, responses=problems(401, 403))
async def list_workflows(
    principal: CurrentPrincipal,
    session: SessionDep,
    client: TemporalDep,
    kind: Annotated[str | None, Query(max_length=128, description="Workflow type")] = None,
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    resource_kind: Annotated[str | None, Query(max_length=64)] = None,
    resource_id: Annotated[str | None, Query(max_length=255)] = None,
    project_id: uuid.UUID | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    sort: Literal["started_at", "finished_at", "updated_at", "kind", "status"] = "started_at",
    order: Literal["asc", "desc"] = "desc",
) -> WorkflowRunList:
    """Runs recorded in PostgreSQL (no Temporal call), newest first by default."""
    filters = WorkflowRunFilters(
        kind=kind,
        status=run_status,
        resource_kind=resource_kind,
        resource_id=resource_id,
        project_id=project_id,
    )
    return await WorkflowRunService(session, client).list(
        principal, filters, page=page, limit=limit, sort=sort, descending=order == "desc"
    )


@router.get("/{workflow_id}", response_model=WorkflowRunDetail, responses=problems(401, 404))
async def get_workflow(
    workflow_id: WorkflowId, principal: CurrentPrincipal, session: SessionDep, client: TemporalDep
) -> WorkflowRunDetail:
    """One run, with live progress from the workflow's `progress` query while it runs
    (`progress_source: live`), else the last recorded progress."""
    return await WorkflowRunService(session, client).get(principal, workflow_id)


@router.post(
    "/{workflow_id}/cancel",
    response_model=WorkflowRunDetail,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409),
)
async def cancel_workflow(
    workflow_id: WorkflowId, principal: CurrentPrincipal, session: SessionDep, client: TemporalDep
) -> WorkflowRunDetail:
    """Request cancellation; the workflow compensates and records `cancelled`."""
    return await WorkflowRunService(session, client).cancel(principal, workflow_id)


async def _readable_run(
    workflow_id: WorkflowId, state: StateDep, token: Annotated[str | None, Depends(bearer)]
) -> tuple[Principal, str]:
    # Resolved before the stream starts (an unknown id is a plain 404), in a session of
    # its own: the stream may last hours and must not pin a database connection.
    if not token:
        raise Unauthenticated("a bearer token or API key is required")
    async with session_scope(state.sessions) as session:
        principal = await state.auth.authenticate(session, token)
        await WorkflowRunService(session, state.temporal).require(principal, workflow_id)
    return principal, workflow_id


@router.get(
    "/{workflow_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"description": "`progress` events while the run changes, then `end`"},
        **problems(401, 404),
    },
)
async def workflow_events(
    run: Annotated[tuple[Principal, str], Depends(_readable_run)], state: StateDep
) -> AsyncIterable[ServerSentEvent]:
    """Server-sent events: a `progress` event each time progress changes, then one
    `end` event with the final status."""
    principal, workflow_id = run
    async for event in stream_events(
        state.sessions,
        state.temporal,
        principal,
        workflow_id,
        state.settings.api.events_poll_seconds,
    ):
        yield ServerSentEvent(event=event["event"], data=event["data"])
