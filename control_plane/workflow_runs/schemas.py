from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from workflows.contracts.common import Progress, RunStatus


class WorkflowRunRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    workflow_id: str
    run_id: str
    kind: str
    resource_kind: str
    resource_id: str | None
    tenant_id: uuid.UUID | None
    project_id: uuid.UUID | None
    status: RunStatus
    progress: Progress
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    updated_at: datetime


class WorkflowRunDetail(WorkflowRunRead):
    # `live` when the progress came from the running workflow, `recorded` when from the row.
    progress_source: str


class WorkflowRunList(BaseModel):
    items: list[WorkflowRunRead]
    total: int
    page: int
    limit: int


class WorkflowRunFilters(BaseModel):
    kind: str | None = None
    status: RunStatus | None = None
    resource_kind: str | None = None
    resource_id: str | None = None
    project_id: uuid.UUID | None = None
    # Set by the service from the caller, never from the request.
    tenant_id: uuid.UUID | None = None
    visible_projects: set[uuid.UUID] | None = None
