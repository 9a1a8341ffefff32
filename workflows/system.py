"""`DiagnoseSystem`: checks that a worker of every pool answers on its task queue.

Operators run it after a deploy (or from `cpctl diagnose`) to see, per pool, which host
picked the work up; a pool with no worker shows as a failed step instead of work that
silently waits forever.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts.common import ResourceRef, RunStatus, StepStatus
    from workflows.contracts.system import (
        DiagnoseRequest,
        DiagnoseResult,
        PingRequest,
        PoolFailure,
        PoolPing,
    )
    from workflows.queues import Queue
    from workflows.tracking import TrackedWorkflow, queue_for

PING_ACTIVITY = "ping_pool"


def step_name(queue: Queue) -> str:
    return f"ping {queue.value}"


@workflow.defn(name="DiagnoseSystem")
class DiagnoseSystem(TrackedWorkflow):
    @workflow.run
    async def run(self, request: DiagnoseRequest) -> DiagnoseResult:
        queues = list(dict.fromkeys(request.queues))
        tracker = self.track([step_name(q) for q in queues], ResourceRef(kind="system"))
        tracker.detail = f"waiting up to {request.timeout_seconds}s per pool"
        await self.record()
        try:
            outcomes = await asyncio.gather(
                *(self._ping(q, request.timeout_seconds) for q in queues)
            )
        except asyncio.CancelledError:
            tracker.cancel_open()
            await self.record(RunStatus.CANCELLED, error="cancelled")
            raise
        answered = [o for o in outcomes if isinstance(o, PoolPing)]
        failed = [o for o in outcomes if isinstance(o, PoolFailure)]
        tracker.detail = f"{len(answered)}/{len(queues)} pools answered"
        await self.record(RunStatus.COMPLETED)
        return DiagnoseResult(healthy=not failed, answered=answered, failed=failed)

    async def _ping(self, queue: Queue, wait_seconds: int) -> PoolPing | PoolFailure:
        name = step_name(queue)
        full_queue = queue_for(queue)
        self._tracker.start(name, f"waiting for a worker on {full_queue}")
        try:
            ping: PoolPing = await workflow.execute_activity(
                PING_ACTIVITY,
                PingRequest(queue=queue),
                task_queue=full_queue,
                result_type=PoolPing,
                schedule_to_start_timeout=timedelta(seconds=wait_seconds),
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                # The workflow is being cancelled: let `run` compensate and record it.
                raise asyncio.CancelledError() from err
            if isinstance(err.cause, TimeoutError):
                reason = f"no worker answered on {full_queue} within {wait_seconds}s"
            else:
                reason = f"ping failed: {err.cause or err}"
            self._tracker.finish(name, StepStatus.FAILED, reason)
            return PoolFailure(queue=queue, reason=reason)
        self._tracker.finish(
            name, StepStatus.COMPLETED, f"answered by {ping.worker_host} pid {ping.worker_pid}"
        )
        return ping
