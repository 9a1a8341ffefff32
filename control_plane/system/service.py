"""System operations: the `DiagnoseSystem` workflow that checks every worker pool."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from control_plane.audit import service as audit
from control_plane.core import temporal
from control_plane.core.codec import payload_codec
from control_plane.core.config import Settings
from control_plane.identity.permissions import Principal
from control_plane.workflow_runs.service import WorkflowRunService
from workflows.contracts.common import ResourceRef
from workflows.contracts.system import DiagnoseRequest, DiagnoseResult

DIAGNOSE_WORKFLOW = "DiagnoseSystem"
RESOURCE = ResourceRef(kind="system")


async def start_diagnosis(
    session: AsyncSession,
    client: Client,
    request: DiagnoseRequest,
    principal: Principal,
    *,
    queue_prefix: str,
) -> str:
    workflow_id = f"system-diagnose-{uuid4()}"
    resource = RESOURCE.model_copy(update={"tenant_id": principal.tenant_id})
    handle = await temporal.start_workflow(
        client,
        DIAGNOSE_WORKFLOW,
        request,
        workflow_id=workflow_id,
        resource=resource,
        queue_prefix=queue_prefix,
    )
    await WorkflowRunService(session, client).record_started(handle, DIAGNOSE_WORKFLOW, resource)
    await audit.record(
        session,
        actor=principal,
        action="system.diagnose",
        resource_kind="workflow",
        resource_id=workflow_id,
    )
    return workflow_id


async def run_diagnosis(settings: Settings, timeout_seconds: int) -> DiagnoseResult:
    """Start a diagnosis and wait for its result (used by `cpctl diagnose`)."""
    client = await temporal.connect(settings.temporal, codec=payload_codec(settings.codec))
    handle = await temporal.start_workflow(
        client,
        DIAGNOSE_WORKFLOW,
        DiagnoseRequest(timeout_seconds=timeout_seconds),
        workflow_id=f"system-diagnose-{uuid4()}",
        resource=RESOURCE,
        queue_prefix=settings.temporal.task_queue_prefix,
        result_type=DiagnoseResult,
    )
    result = await handle.result(rpc_timeout=timedelta(seconds=timeout_seconds + 30))
    assert isinstance(result, DiagnoseResult)
    return result
