"""System operations: check that every worker pool answers."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, TemporalDep, TenantAdmin
from api.errors import problems
from control_plane.system.service import start_diagnosis
from workflows.contracts.system import DiagnoseRequest

router = APIRouter(prefix="/api/v1/system", tags=["system"])


class WorkflowStarted(BaseModel):
    workflow_id: str


@router.post(
    "/diagnostics",
    response_model=WorkflowStarted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403),
)
async def diagnose(
    request: DiagnoseRequest,
    principal: TenantAdmin,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> WorkflowStarted:
    """Start `DiagnoseSystem`: a ping on each pool's task queue, answered by a worker.
    Follow it at `/api/v1/workflows/{workflow_id}` or its `/events` stream."""
    workflow_id = await start_diagnosis(
        session, client, request, principal, queue_prefix=settings.temporal.task_queue_prefix
    )
    return WorkflowStarted(workflow_id=workflow_id)
