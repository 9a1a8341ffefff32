"""Progress and bookkeeping shared by every workflow.

A workflow keeps a `ProgressTracker`, answers the `progress` query from it, and mirrors
its status into `workflow_runs` through the `record_workflow_run` activity at each step
transition, so lists never need Temporal.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts.common import (
        PROGRESS_QUERY,
        Progress,
        ProgressStep,
        ResourceRef,
        RunRecord,
        RunStatus,
        StepStatus,
    )
    from workflows.queues import QUEUE_PREFIX_MEMO, RESOURCE_MEMO, Queue, task_queue

RECORD_RUN_ACTIVITY = "record_workflow_run"

# Bookkeeping is cheap and must eventually succeed; it never fails a workflow.
BOOKKEEPING_TIMEOUT = timedelta(seconds=30)
BOOKKEEPING_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
)


def queue_for(queue: Queue) -> str:
    """The full task-queue name of a pool, under this workflow's deployment prefix."""
    prefix: str = workflow.memo_value(QUEUE_PREFIX_MEMO, "", type_hint=str)
    return task_queue(queue, prefix)


class ProgressTracker:
    def __init__(self, steps: list[str]) -> None:
        self._steps = {name: ProgressStep(name=name) for name in steps}
        self.detail: str | None = None

    def step(self, name: str) -> ProgressStep:
        return self._steps[name]

    def start(self, name: str, detail: str | None = None) -> None:
        step = self._steps[name]
        step.status = StepStatus.RUNNING
        step.started_at = workflow.now()
        step.detail = detail

    def update(self, name: str, *, detail: str | None = None, percent: float | None = None) -> None:
        step = self._steps[name]
        if detail is not None:
            step.detail = detail
        if percent is not None:
            step.percent = max(0.0, min(100.0, percent))

    def finish(self, name: str, status: StepStatus, detail: str | None = None) -> None:
        step = self._steps[name]
        step.status = status
        step.finished_at = workflow.now()
        if step.started_at is None:
            step.started_at = step.finished_at
        if detail is not None:
            step.detail = detail
        if status is StepStatus.COMPLETED:
            step.percent = 100.0

    def cancel_open(self) -> None:
        for step in self._steps.values():
            if step.status in (StepStatus.PENDING, StepStatus.RUNNING):
                self.finish(step.name, StepStatus.CANCELLED)

    def snapshot(self, status: RunStatus) -> Progress:
        steps = [step.model_copy() for step in self._steps.values()]
        done = sum(
            1.0
            if s.status in (StepStatus.COMPLETED, StepStatus.SKIPPED)
            else (s.percent or 0) / 100
            for s in steps
        )
        percent = 100.0 if status is RunStatus.COMPLETED else round(100 * done / len(steps), 1)
        return Progress(
            status=status,
            steps=steps,
            percent=percent if steps else 0.0,
            detail=self.detail,
            updated_at=workflow.now(),
        )


class TrackedWorkflow:
    """Base for workflows: `progress` query plus `workflow_runs` bookkeeping."""

    _tracker: ProgressTracker
    _resource: ResourceRef
    _status: RunStatus = RunStatus.RUNNING
    _error: str | None = None

    def track(self, steps: list[str], resource: ResourceRef) -> ProgressTracker:
        """`resource` is the fallback; the starter's memo (tenant, project) wins."""
        self._tracker = ProgressTracker(steps)
        started_for: ResourceRef | None = workflow.memo_value(
            RESOURCE_MEMO, None, type_hint=ResourceRef
        )
        self._resource = started_for or resource
        return self._tracker

    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._tracker.snapshot(self._status)

    async def record(self, status: RunStatus = RunStatus.RUNNING, error: str | None = None) -> None:
        self._status = status
        self._error = error
        info = workflow.info()
        await workflow.execute_activity(
            RECORD_RUN_ACTIVITY,
            RunRecord(
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                kind=info.workflow_type,
                resource=self._resource,
                status=status,
                progress=self._tracker.snapshot(status),
                error=error,
                started_at=info.start_time,
                finished_at=None if status is RunStatus.RUNNING else workflow.now(),
            ),
            task_queue=queue_for(Queue.ORCHESTRATION),
            start_to_close_timeout=BOOKKEEPING_TIMEOUT,
            retry_policy=BOOKKEEPING_RETRY,
        )
