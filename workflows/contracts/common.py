"""Shared workflow contracts: search attributes, progress, run bookkeeping."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field
from temporalio.common import SearchAttributeKey

# Registered at start-up by API and workers; set on every workflow we start.
SA_PROJECT_ID = SearchAttributeKey.for_keyword("CpProjectId")
SA_RESOURCE_KIND = SearchAttributeKey.for_keyword("CpResourceKind")
SA_RESOURCE_ID = SearchAttributeKey.for_keyword("CpResourceId")
SEARCH_ATTRIBUTE_KEYS = (SA_PROJECT_ID, SA_RESOURCE_KIND, SA_RESOURCE_ID)

PROGRESS_QUERY = "progress"


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


# An integer as JSON Schema means it: `50.0` passes, `true` does not (pydantic's lax
# mode would read it as 1).
Integer = Annotated[int, BeforeValidator(_not_a_bool)]


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TERMINATED = "terminated"
    TIMED_OUT = "timed_out"
    CONTINUED_AS_NEW = "continued_as_new"

    @property
    def finished(self) -> bool:
        return self is not RunStatus.RUNNING


class ProgressStep(BaseModel):
    name: str
    status: StepStatus = StepStatus.PENDING
    detail: str | None = None
    # 0-100 within the step, for steps that can tell (bytes downloaded, requests sent).
    percent: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Progress(BaseModel):
    """What the `progress` query of every workflow answers."""

    status: RunStatus = RunStatus.RUNNING
    steps: list[ProgressStep] = Field(default_factory=list)
    percent: float = 0.0
    detail: str | None = None
    updated_at: datetime | None = None


class ResourceRef(BaseModel):
    kind: str
    id: str | None = None
    project_id: uuid.UUID | None = None
    tenant_id: uuid.UUID | None = None


class RunRecord(BaseModel):
    """Mirrors one workflow run into `workflow_runs` (bookkeeping activity input)."""

    workflow_id: str
    run_id: str
    kind: str
    resource: ResourceRef
    status: RunStatus
    progress: Progress
    error: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
