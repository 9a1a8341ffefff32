"""Cluster lifecycle: `OnboardCluster`, `MonitorCluster`, `DeleteCluster`.

Provider work (reaching the cluster) runs on the `cp-cluster` pool; writing its results
runs on the orchestration pool. Onboarding that fails or is cancelled removes what it
created on the cluster before it records the outcome, so a retry starts clean.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    WorkflowAlreadyStartedError,
)
from temporalio.exceptions import (
    TimeoutError as ActivityTimeout,
)
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts.clusters import (
        NON_RETRYABLE,
        REFRESH_SIGNAL,
        STOP_SIGNAL,
        ClusterStatus,
        ClusterTarget,
        ConnectionInfo,
        DeleteClusterRequest,
        DeleteClusterResult,
        HealthReport,
        Inventory,
        MonitorClusterRequest,
        MonitorClusterResult,
        OnboardClusterRequest,
        OnboardClusterResult,
        PrepareResult,
        SaveInventory,
        StatusChange,
        monitor_workflow_id,
    )
    from workflows.contracts.common import ResourceRef, RunStatus, StepStatus
    from workflows.queues import QUEUE_PREFIX_MEMO, RESOURCE_MEMO, Queue
    from workflows.tracking import TrackedWorkflow, queue_for

T = TypeVar("T")

RESOURCE_KIND = "cluster"
# Patch ids (never reuse or rename): changes to in-flight logic.
MONITOR_BEFORE_AVAILABLE = "monitor-before-available"
# Cluster API calls are short; anything slower is a hung connection. The activities
# heartbeat while they wait, so a dead worker is noticed within the heartbeat timeout.
CLUSTER_CALL_TIMEOUT = timedelta(seconds=60)
CLUSTER_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
CLUSTER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE,
)
# The monitor counts failed checks itself: one attempt per check.
CHECK_RETRY = RetryPolicy(maximum_attempts=1)
DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=NON_RETRYABLE,
)
# Statuses a late write from onboarding or the monitor must not overwrite.
BEING_DELETED = [ClusterStatus.DELETING, ClusterStatus.DELETED]


def cluster_resource(target: ClusterTarget) -> ResourceRef:
    return ResourceRef(kind=RESOURCE_KIND, id=str(target.cluster_id), tenant_id=target.tenant_id)


def failure_reason(err: BaseException) -> str:
    """The innermost message of an activity failure (what the provider said)."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ActivityTimeout):
        return "the cluster did not answer in time"
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


def is_cancellation(err: BaseException) -> bool:
    return isinstance(err, asyncio.CancelledError) or (
        isinstance(err, ActivityError) and isinstance(err.cause, CancelledError)
    )


def next_status(
    current: ClusterStatus, failures: int, report: HealthReport, threshold: int
) -> tuple[ClusterStatus, int, str]:
    """The status after one health check: (status, consecutive failures, reason).

    Reachable: available when every node is ready, degraded otherwise. Unreachable:
    the status holds until `threshold` consecutive checks failed, so one dropped
    connection does not flap the cluster."""
    if report.reachable and report.inventory is not None:
        nodes = report.inventory.nodes
        ready = [n for n in nodes if n.ready]
        if not nodes:
            return ClusterStatus.DEGRADED, 0, "the cluster reports no nodes"
        if len(ready) < len(nodes):
            why = "; ".join(f"{n.name}: {n.reason or 'not ready'}" for n in nodes if not n.ready)
            return ClusterStatus.DEGRADED, 0, f"{len(ready)} of {len(nodes)} nodes ready ({why})"
        return ClusterStatus.AVAILABLE, 0, f"{len(nodes)} of {len(nodes)} nodes ready"
    failures += 1
    if failures >= threshold:
        return (
            ClusterStatus.UNREACHABLE,
            failures,
            f"{report.reason} ({failures} consecutive failed checks)",
        )
    return current, failures, f"check {failures}/{threshold} failed: {report.reason}"


class ClusterWorkflow(TrackedWorkflow):
    async def _cluster_call(
        self,
        activity: str,
        target: ClusterTarget,
        result_type: type[T],
        retry: RetryPolicy = CLUSTER_RETRY,
    ) -> T:
        result: T = await workflow.execute_activity(
            activity,
            target,
            task_queue=queue_for(Queue.CLUSTER),
            result_type=result_type,
            start_to_close_timeout=CLUSTER_CALL_TIMEOUT,
            heartbeat_timeout=CLUSTER_HEARTBEAT_TIMEOUT,
            retry_policy=retry,
        )
        return result

    async def _db_call(self, activity: str, payload: Any) -> ClusterStatus:
        status: ClusterStatus = await workflow.execute_activity(
            activity,
            payload,
            task_queue=queue_for(Queue.ORCHESTRATION),
            result_type=ClusterStatus,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return status

    async def _set_status(
        self,
        target: ClusterTarget,
        status: ClusterStatus,
        reason: str,
        unless_in: list[ClusterStatus] | None = None,
    ) -> ClusterStatus:
        change = StatusChange(
            cluster_id=target.cluster_id, status=status, reason=reason, unless_in=unless_in or []
        )
        return await self._db_call("set_cluster_status", change)

    async def _teardown(self, target: ClusterTarget) -> list[str]:
        return await self._cluster_call("teardown_cluster", target, list[str])


ONBOARD_STEPS = [
    "validate credentials",
    "connect",
    "discover",
    "prepare",
    "smoke check",
    "start monitor",
]


@workflow.defn(name="OnboardCluster")
class OnboardCluster(ClusterWorkflow):
    @workflow.run
    async def run(self, request: OnboardClusterRequest) -> OnboardClusterResult:
        target = request.cluster
        tracker = self.track(ONBOARD_STEPS, cluster_resource(target))
        prepared = False
        step = ONBOARD_STEPS[0]
        # Cancellation can land on any await, the first bookkeeping call included.
        try:
            await self.record()
            tracker.start(step)
            detail = await self._cluster_call("validate_cluster_credential", target, str)
            tracker.finish(step, StepStatus.COMPLETED, detail)

            step = "connect"
            tracker.start(step, f"up to {request.monitor.connect_attempts} attempts")
            await self.record()
            connect_retry = RetryPolicy(
                initial_interval=timedelta(seconds=1),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=30),
                maximum_attempts=request.monitor.connect_attempts,
                non_retryable_error_types=NON_RETRYABLE,
            )
            connection = await self._cluster_call(
                "connect_cluster", target, ConnectionInfo, connect_retry
            )
            tracker.finish(
                step,
                StepStatus.COMPLETED,
                f"{connection.platform.value} {connection.version} at {connection.server_url}",
            )

            step = "discover"
            tracker.start(step)
            inventory = await self._cluster_call("discover_cluster", target, Inventory)
            await self._db_call(
                "save_cluster_inventory",
                SaveInventory(
                    cluster_id=target.cluster_id,
                    inventory=inventory,
                    status=ClusterStatus.ONBOARDING,
                    reason="inventory discovered",
                ),
            )
            tracker.finish(step, StepStatus.COMPLETED, describe(inventory))
            await self.record()

            step = "prepare"
            tracker.start(step)
            # From here on a failure may leave objects behind: compensate.
            prepared = True
            prepare = await self._cluster_call("prepare_cluster", target, PrepareResult)
            tracker.finish(step, StepStatus.COMPLETED, prepare.detail or ", ".join(prepare.created))

            step = "smoke check"
            tracker.start(step)
            smoke = await self._cluster_call("smoke_check_cluster", target, str)
            tracker.finish(step, StepStatus.COMPLETED, smoke)

            step = "start monitor"
            tracker.start(step)
            reason = f"onboarded: {describe(inventory)}"
            if workflow.patched(MONITOR_BEFORE_AVAILABLE):
                # A cluster shown `available` always has a monitor to refresh, and
                # onboarding judges the inventory by the monitor's rule (no ready
                # node: `degraded`), so the two never disagree.
                monitor_id = await self._start_monitor(request)
                judged, _, why = next_status(
                    ClusterStatus.ONBOARDING,
                    0,
                    HealthReport(reachable=True, inventory=inventory, checked_at=workflow.now()),
                    request.monitor.failure_threshold,
                )
                if judged is not ClusterStatus.AVAILABLE:
                    reason = f"onboarded, {why}"
                stored = await self._set_status(target, judged, reason, BEING_DELETED)
            else:
                stored = await self._set_status(
                    target, ClusterStatus.AVAILABLE, reason, BEING_DELETED
                )
                monitor_id = await self._start_monitor(request)
            tracker.finish(step, StepStatus.COMPLETED, monitor_id)
        except (ActivityError, asyncio.CancelledError) as err:
            if is_cancellation(err):
                await self._compensate(
                    target, prepared, ClusterStatus.DELETED, "onboarding cancelled"
                )
                await self.record(RunStatus.CANCELLED, error="cancelled")
                raise asyncio.CancelledError() from err
            reason = f"{step} failed: {failure_reason(err)}"
            tracker.finish(step, StepStatus.FAILED, failure_reason(err))
            await self._compensate(target, prepared, ClusterStatus.FAILED, reason)
            await self.record(RunStatus.FAILED, error=reason)
            raise ApplicationError(reason, type="OnboardingFailed", non_retryable=True) from err
        tracker.detail = f"cluster {stored.value}"
        await self.record(RunStatus.COMPLETED)
        return OnboardClusterResult(status=stored, monitor_workflow_id=monitor_id)

    async def _compensate(
        self, target: ClusterTarget, prepared: bool, status: ClusterStatus, reason: str
    ) -> None:
        self._tracker.cancel_open()
        if prepared:
            try:
                removed = await self._teardown(target)
                if removed:
                    reason = f"{reason}; removed {', '.join(removed)}"
            except ActivityError as err:
                reason = (
                    f"{reason}; could not remove what onboarding created: {failure_reason(err)}"
                )
        self._tracker.detail = reason
        await self._set_status(target, status, reason, BEING_DELETED)

    async def _start_monitor(self, request: OnboardClusterRequest) -> str:
        monitor_id = monitor_workflow_id(request.cluster.cluster_id)
        try:
            await workflow.start_child_workflow(
                "MonitorCluster",
                MonitorClusterRequest(cluster=request.cluster, monitor=request.monitor),
                id=monitor_id,
                # The monitor outlives onboarding.
                parent_close_policy=ParentClosePolicy.ABANDON,
                search_attributes=workflow.info().typed_search_attributes,
                memo={
                    QUEUE_PREFIX_MEMO: workflow.memo_value(QUEUE_PREFIX_MEMO, "", type_hint=str),
                    RESOURCE_MEMO: self._resource,
                },
            )
        except WorkflowAlreadyStartedError:
            workflow.logger.info("monitor %s already running", monitor_id)
        return monitor_id


def describe(inventory: Inventory) -> str:
    nodes = inventory.nodes
    ready = sum(1 for n in nodes if n.ready)
    gpus = sum(a.count for n in nodes for a in n.accelerators)
    cpu = sum(n.cpu_cores for n in nodes)
    memory_gib = sum(n.memory_mb for n in nodes) / 1024
    return (
        f"{ready}/{len(nodes)} nodes ready, {cpu:g} CPU cores, "
        f"{memory_gib:.1f} GiB memory, {gpus} accelerators"
    )


@workflow.defn(name="MonitorCluster")
class MonitorCluster(ClusterWorkflow):
    def __init__(self) -> None:
        self._refresh = False
        self._stop = False

    @workflow.signal(name=REFRESH_SIGNAL)
    def refresh(self) -> None:
        self._refresh = True

    @workflow.signal(name=STOP_SIGNAL)
    def stop(self) -> None:
        self._stop = True

    @workflow.run
    async def run(self, request: MonitorClusterRequest) -> MonitorClusterResult:
        target = request.cluster
        settings = request.monitor
        tracker = self.track(["watch"], cluster_resource(target))
        status = request.status
        failures = request.consecutive_failures
        checks = request.checks
        tracker.start("watch", f"every {settings.interval_seconds}s")
        await self.record()
        gone = False
        for _ in range(request.checks_per_run):
            self._refresh = False
            report = await self._check(target)
            new_status, failures, reason = next_status(
                status, failures, report, settings.failure_threshold
            )
            if report.inventory is not None:
                stored = await self._db_call(
                    "save_cluster_inventory",
                    SaveInventory(
                        cluster_id=target.cluster_id,
                        inventory=report.inventory,
                        status=new_status,
                        reason=reason,
                        unless_in=BEING_DELETED,
                    ),
                )
            else:
                stored = await self._set_status(target, new_status, reason, BEING_DELETED)
            checks += 1
            tracker.detail = f"{stored.value}: {reason}"
            tracker.update("watch", detail=f"check {checks}: {stored.value}")
            if stored in BEING_DELETED:
                gone = True
                break
            if stored is not status:
                status = stored
                await self.record()
            if workflow.info().is_continue_as_new_suggested():
                break
            try:
                await workflow.wait_condition(
                    lambda: self._refresh or self._stop,
                    timeout=timedelta(seconds=settings.interval_seconds),
                )
            except TimeoutError:
                pass
            if self._stop:
                break
        if not (self._stop or gone):
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(
                request.model_copy(
                    update={"status": status, "consecutive_failures": failures, "checks": checks}
                )
            )
        why = "stop signal" if self._stop else "the cluster is being deleted"
        tracker.finish("watch", StepStatus.COMPLETED, f"stopped by {why} after {checks} checks")
        await self.record(RunStatus.COMPLETED)
        return MonitorClusterResult(checks=checks, status=status)

    async def _check(self, target: ClusterTarget) -> HealthReport:
        try:
            return await self._cluster_call(
                "check_cluster_health", target, HealthReport, CHECK_RETRY
            )
        except ActivityError as err:
            if is_cancellation(err):
                raise asyncio.CancelledError() from err
            return HealthReport(
                reachable=False, reason=failure_reason(err), checked_at=workflow.now()
            )


DELETE_STEPS = ["stop monitor", "remove resources", "mark deleted"]


@workflow.defn(name="DeleteCluster")
class DeleteCluster(ClusterWorkflow):
    @workflow.run
    async def run(self, request: DeleteClusterRequest) -> DeleteClusterResult:
        target = request.cluster
        tracker = self.track(DELETE_STEPS, cluster_resource(target))
        try:
            await self.record()
            tracker.start("stop monitor")
            detail = await self._stop_monitor(target)
            tracker.finish("stop monitor", StepStatus.COMPLETED, detail)

            tracker.start("remove resources")
            await self.record()
            try:
                removed = await self._teardown(target)
            except ActivityError as err:
                if is_cancellation(err) or not request.force:
                    raise
                removed = []
                tracker.finish(
                    "remove resources",
                    StepStatus.FAILED,
                    f"left on the cluster (force): {failure_reason(err)}",
                )
            else:
                tracker.finish(
                    "remove resources",
                    StepStatus.COMPLETED,
                    ", ".join(removed) or "nothing to remove",
                )

            tracker.start("mark deleted")
            await self._set_status(target, ClusterStatus.DELETED, "deleted")
            tracker.finish("mark deleted", StepStatus.COMPLETED)
        except (ActivityError, asyncio.CancelledError) as err:
            tracker.cancel_open()
            if is_cancellation(err):
                reason = "deletion cancelled; delete the cluster again to finish"
                await self._set_status(target, ClusterStatus.FAILED, reason)
                await self.record(RunStatus.CANCELLED, error="cancelled")
                raise asyncio.CancelledError() from err
            reason = (
                f"deletion failed: {failure_reason(err)}; delete again with force=true "
                "to delete the record and leave the cluster's objects in place"
            )
            await self._set_status(target, ClusterStatus.FAILED, reason)
            await self.record(RunStatus.FAILED, error=reason)
            raise ApplicationError(reason, type="DeletionFailed", non_retryable=True) from err
        await self.record(RunStatus.COMPLETED)
        return DeleteClusterResult(removed=removed)

    async def _stop_monitor(self, target: ClusterTarget) -> str:
        monitor_id = monitor_workflow_id(target.cluster_id)
        handle = workflow.get_external_workflow_handle(monitor_id)
        try:
            await handle.signal(STOP_SIGNAL)
        except FailureError as err:
            # No monitor running (never started, or already stopped): nothing to stop.
            return f"no running monitor ({err.message})"
        return f"signalled {monitor_id}"
