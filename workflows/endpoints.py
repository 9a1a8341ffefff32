"""`DeployEndpoint`: one long-running workflow per endpoint (`endpoint-{id}`).

It deploys (validate and place -> create replicas -> wait until they serve -> publish to
the routing table) and then owns the endpoint's life in one loop: every
`reconcile_interval_s` (sooner while replicas start or a message arrived) it observes
the replicas and their load, replaces dead ones, lets the autoscaling policy decide the
count, applies it, and mirrors everything into PostgreSQL. So the status in the
database is always what the last observation saw, never a guess.

Messages: update `set_autoscale` (a new policy), signal `scale` (pin the replica count,
`{"replicas": null}` unpins), signal `wake` (scale from zero now: the gateway sends it
on the first request to an idle endpoint), update `delete` (unpublish, let in-flight
requests finish within a grace period, delete the replicas, mark `deleted`), query
`state`. Cancelling the workflow deletes the endpoint the same way without the grace.

The loop continues as new when Temporal suggests it (or every `max_iterations`
iterations), carrying all of its state in `EndpointLoopState`.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.autoscale import decide
    from workflows.contracts.autoscale import AutoscalePolicy, ScalingSample
    from workflows.contracts.common import ResourceRef, RunStatus, StepStatus
    from workflows.contracts.endpoints import (
        DELETE_UPDATE,
        ENDPOINT_NON_RETRYABLE,
        SCALE_SIGNAL,
        SET_AUTOSCALE_UPDATE,
        STATE_QUERY,
        WAKE_SIGNAL,
        DeleteEndpointRequest,
        DeployEndpointRequest,
        DeployEndpointResult,
        EndpointLoopState,
        EndpointSnapshot,
        EndpointStateView,
        EndpointStatus,
        EndpointTarget,
        Observation,
        PreparedEndpoint,
        ReplicaCall,
        ReplicaInfo,
        ReplicaState,
        ScaleRequest,
        ScalingEventRecord,
    )
    from workflows.queues import Queue
    from workflows.tracking import TrackedWorkflow, queue_for

T = TypeVar("T")

RESOURCE_KIND = "endpoint"
# While replicas start (or a wake is pending) the loop looks this often.
FAST_INTERVAL_S = 1.0
DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=ENDPOINT_NON_RETRYABLE,
)
# Replica calls talk to a cluster: retried with back-off, heartbeating.
REPLICA_TIMEOUT = timedelta(minutes=5)
# Between taking replicas out of the routing table and stopping them: gateways refresh
# their tables within a second of a change.
UNROUTE_GRACE = timedelta(seconds=2)
DRAIN_BEFORE_STOP_PATCH = "endpoint-unroute-before-scale-down"
STARTING_IS_LOAD_PATCH = "autoscale-starting-replicas-are-load"
REPLICA_HEARTBEAT = timedelta(seconds=10)
REPLICA_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=ENDPOINT_NON_RETRYABLE,
)
# An observation that fails is skipped (the next one comes soon): one attempt each.
OBSERVE_TIMEOUT = timedelta(seconds=30)
OBSERVE_RETRY = RetryPolicy(maximum_attempts=1)

DEPLOY_STEPS = ["validate and place", "create replicas", "wait until ready", "publish", "serve"]
GONE = [EndpointStatus.DELETING, EndpointStatus.DELETED]


class _DeleteRequested(Exception):
    """Raised inside the deploy phase when a `delete` arrived: go and drain."""


def endpoint_resource(target: EndpointTarget) -> ResourceRef:
    return ResourceRef(
        kind=RESOURCE_KIND,
        id=str(target.endpoint_id),
        tenant_id=target.tenant_id,
        project_id=target.project_id,
    )


def failure_reason(err: BaseException) -> str:
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


def status_after(
    desired: int, replicas: list[ReplicaInfo], previous: EndpointStatus, lost: bool
) -> EndpointStatus:
    """The endpoint's status from what one observation saw.

    At zero desired replicas it is `idle`. With every desired replica ready, `running`.
    Below that it is `degraded` when replicas were lost (died, stopped answering), or
    it already was; replicas that are merely starting (a scale-up, a wake) keep the
    status it had."""
    ready = sum(1 for r in replicas if r.state is ReplicaState.READY)
    if desired == 0:
        return EndpointStatus.IDLE
    if ready >= desired:
        return EndpointStatus.RUNNING
    if lost or previous is EndpointStatus.DEGRADED:
        return EndpointStatus.DEGRADED
    if previous is EndpointStatus.IDLE:
        return EndpointStatus.RUNNING if ready else EndpointStatus.IDLE
    return previous


@workflow.defn(name="DeployEndpoint")
class DeployEndpoint(TrackedWorkflow):
    @workflow.init
    def __init__(self, request: DeployEndpointRequest) -> None:
        self._request = request
        self._loop = request.carried or EndpointLoopState(autoscale=request.autoscale)
        self._replicas: list[ReplicaInfo] = []
        self._delete: DeleteEndpointRequest | None = None
        self._done = False
        self._poke = False
        self._last_decision = ""
        self._load = 0.0
        self._prepared: PreparedEndpoint | None = None

    # --- messages -------------------------------------------------------------------

    @workflow.query(name=STATE_QUERY)
    def state(self) -> EndpointStateView:
        return EndpointStateView(
            status=self._loop.status,
            replicas_desired=self._loop.replicas,
            replicas=self._replicas,
            autoscale=self._loop.autoscale,
            manual_replicas=self._loop.autoscale_state.manual_replicas,
            last_decision=self._last_decision,
            load=self._load,
            published=self._loop.published,
            recreated_total=self._loop.recreated_total,
            cluster_id=self._loop.cluster_id,
        )

    @workflow.update(name=SET_AUTOSCALE_UPDATE)
    def set_autoscale(self, policy: AutoscalePolicy) -> AutoscalePolicy:
        self._loop.autoscale = policy
        self._poke = True
        return policy

    @set_autoscale.validator
    def _check_autoscale(self, policy: AutoscalePolicy) -> None:
        if self._delete is not None or self._loop.status in GONE:
            raise ValueError("the endpoint is being deleted")
        # The converter validated the payload; re-check in case it was built without it.
        AutoscalePolicy.model_validate(policy.model_dump())

    @workflow.signal(name=SCALE_SIGNAL)
    def scale(self, request: ScaleRequest) -> None:
        self._loop.autoscale_state = self._loop.autoscale_state.pinned(request.replicas)
        self._poke = True

    @workflow.signal(name=WAKE_SIGNAL)
    def wake(self) -> None:
        if self._loop.replicas == 0:
            self._loop.wake_pending = True
        self._poke = True

    @workflow.update(name=DELETE_UPDATE)
    async def delete(self, request: DeleteEndpointRequest) -> EndpointStatus:
        if self._delete is None:
            self._delete = request
        self._poke = True
        await workflow.wait_condition(lambda: self._done)
        return self._loop.status

    # --- activities -----------------------------------------------------------------

    async def _db(self, activity: str, payload: Any, result_type: type[T]) -> T:
        result: T = await workflow.execute_activity(
            activity,
            payload,
            task_queue=queue_for(Queue.ORCHESTRATION),
            result_type=result_type,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return result

    async def _replica_call(
        self,
        activity: str,
        call: ReplicaCall,
        result_type: type[T],
        *,
        limit: timedelta = REPLICA_TIMEOUT,
        retry: RetryPolicy = REPLICA_RETRY,
    ) -> T:
        result: T = await workflow.execute_activity(
            activity,
            call,
            task_queue=queue_for(Queue.DEPLOY),
            result_type=result_type,
            start_to_close_timeout=limit,
            heartbeat_timeout=REPLICA_HEARTBEAT,
            retry_policy=retry,
        )
        return result

    def _call(self, replicas: int | None = None) -> ReplicaCall:
        assert self._prepared is not None
        spec = self._prepared.spec.model_copy(
            update={"replicas": self._loop.replicas if replicas is None else replicas}
        )
        return ReplicaCall(cluster=self._prepared.cluster, spec=spec)

    async def _save(
        self,
        status: EndpointStatus,
        reason: str = "",
        *,
        replicas: list[ReplicaInfo] | None = None,
        loads: dict[str, float] | None = None,
        events: list[ScalingEventRecord] | None = None,
        guard: bool = True,
    ) -> EndpointStatus:
        self._loop.status = status
        snapshot = EndpointSnapshot(
            endpoint_id=self._request.target.endpoint_id,
            status=status,
            reason=reason,
            replicas_desired=self._loop.replicas,
            replicas=replicas,
            loads=loads or {},
            load=self._load,
            published=self._loop.published,
            autoscale=self._loop.autoscale,
            manual_replicas=self._loop.autoscale_state.manual_replicas,
            events=events or [],
            unless_in=GONE if guard else [],
        )
        return await self._db("save_endpoint_state", snapshot, EndpointStatus)

    # --- the run --------------------------------------------------------------------

    @workflow.run
    async def run(self, request: DeployEndpointRequest) -> DeployEndpointResult:
        target = request.target
        tracker = self.track(DEPLOY_STEPS, endpoint_resource(target))
        try:
            if request.carried is None:
                await self.record()
                await self._deploy(request)
            else:
                assert request.carried.spec is not None
                assert request.carried.cluster is not None
                self._prepared = PreparedEndpoint(
                    cluster=request.carried.cluster, spec=request.carried.spec
                )
                for step in DEPLOY_STEPS[:-1]:
                    tracker.finish(step, StepStatus.SKIPPED, "done by an earlier run")
            tracker.start("serve", "watching replicas and load")
            await self._serve(request)
        except _DeleteRequested:
            pass
        except asyncio.CancelledError:
            # Cancellation from the UI or CLI: the endpoint goes, nothing is left running.
            tracker.cancel_open()
            await self._drain(DeleteEndpointRequest(grace_s=0))
            await self.record(RunStatus.CANCELLED, "cancelled: endpoint deleted")
            raise
        except ActivityError as err:
            reason = failure_reason(err)
            tracker.detail = reason
            for step in DEPLOY_STEPS:
                if tracker.step(step).status is StepStatus.RUNNING:
                    tracker.finish(step, StepStatus.FAILED, reason)
            if self._prepared is not None:
                await self._replica_call("delete_endpoint_replicas", self._call(0), list[str])
            self._loop.published = False
            self._loop.replicas = 0
            await self._save(EndpointStatus.FAILED, reason, replicas=[])
            self._done = True
            await self.record(RunStatus.FAILED, reason)
            return DeployEndpointResult(status=EndpointStatus.FAILED, reason=reason)
        # A delete was asked.
        assert self._delete is not None
        tracker.cancel_open()
        await self._drain(self._delete)
        tracker.detail = "deleted"
        await self.record(RunStatus.COMPLETED)
        return DeployEndpointResult(status=EndpointStatus.DELETED, reason="deleted")

    def _check_delete(self) -> None:
        if self._delete is not None:
            raise _DeleteRequested()

    async def _deploy(self, request: DeployEndpointRequest) -> None:
        tracker = self._tracker
        step = "validate and place"
        tracker.start(step)
        self._loop.status = EndpointStatus.DEPLOYING
        prepared = await self._db("prepare_endpoint", request.target, PreparedEndpoint)
        self._prepared = prepared
        self._loop.spec = prepared.spec
        self._loop.cluster_id = prepared.cluster.cluster_id
        self._loop.cluster = prepared.cluster
        tracker.finish(step, StepStatus.COMPLETED, prepared.placement)
        self._check_delete()

        self._loop.replicas = request.initial_replicas
        step = "create replicas"
        tracker.start(step, f"{self._loop.replicas} replica(s) of {prepared.spec.launch.engine}")
        replicas = await self._replica_call(
            "ensure_endpoint_replicas", self._call(), list[ReplicaInfo]
        )
        self._replicas = replicas
        tracker.finish(step, StepStatus.COMPLETED, f"{len(replicas)} replica(s) started")
        self._check_delete()

        step = "wait until ready"
        tracker.start(step)
        startup = prepared.spec.launch.startup_timeout_s
        replicas = await self._replica_call(
            "wait_endpoint_ready",
            self._call(),
            list[ReplicaInfo],
            limit=timedelta(seconds=startup + 60),
            retry=RetryPolicy(maximum_attempts=2, non_retryable_error_types=ENDPOINT_NON_RETRYABLE),
        )
        self._replicas = replicas
        tracker.finish(step, StepStatus.COMPLETED, f"{len(replicas)} replica(s) serve")
        self._check_delete()

        step = "publish"
        tracker.start(step)
        self._loop.published = True
        status = EndpointStatus.IDLE if self._loop.replicas == 0 else EndpointStatus.RUNNING
        await self._save(status, "serving", replicas=replicas)
        tracker.finish(step, StepStatus.COMPLETED, "in the routing table")
        await self.record()

    async def _serve(self, request: DeployEndpointRequest) -> None:
        interval = request.reconcile_interval_s
        while True:
            starting = any(r.state is ReplicaState.STARTING for r in self._replicas)
            wait = min(interval, FAST_INTERVAL_S) if starting else interval
            # Times out (TimeoutError) on a quiet interval: then it is simply time to look.
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._poke or self._delete is not None,
                    timeout=timedelta(seconds=wait),
                )
            self._poke = False
            self._check_delete()
            await self._reconcile()
            self._loop.iterations += 1
            if self._delete is None and (
                workflow.info().is_continue_as_new_suggested()
                or self._loop.iterations >= request.max_iterations
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                self._check_delete()
                self._loop.iterations = 0
                workflow.continue_as_new(request.model_copy(update={"carried": self._loop}))

    async def _reconcile(self) -> None:
        observation = await self._observe()
        if observation is None:
            return
        now = workflow.now()
        replicas = observation.replicas
        loads = {load.name: load.running + load.waiting for load in observation.loads}
        self._load = observation.running + observation.waiting
        events: list[ScalingEventRecord] = []

        waking = self._loop.wake_pending and self._loop.replicas == 0
        sample = ScalingSample(
            time=now.timestamp(),
            running=observation.running,
            # A wake is load the replicas could not see: requests wait at the gateway.
            waiting=max(observation.waiting, 1.0) if waking else observation.waiting,
            replicas_ready=sum(1 for r in replicas if r.state is ReplicaState.READY),
        )
        self._loop.wake_pending = False
        before = self._loop.replicas
        decision, self._loop.autoscale_state = decide(
            self._loop.autoscale,
            self._loop.autoscale_state,
            sample,
            before,
            starting_is_load=workflow.patched(STARTING_IS_LOAD_PATCH),
        )
        self._last_decision = decision.reason
        if decision.changed:
            self._loop.replicas = decision.replicas
            trigger = (
                "manual"
                if self._loop.autoscale_state.manual_replicas is not None
                else "wake"
                if waking
                else "autoscale"
            )
            events.append(
                ScalingEventRecord(
                    time=now,
                    from_replicas=before,
                    to_replicas=decision.replicas,
                    reason=decision.reason,
                    metric=decision.metric,
                    trigger=trigger,
                )
            )
        lost = [r for r in replicas if r.state in (ReplicaState.EXITED, ReplicaState.UNHEALTHY)]
        if lost or decision.changed or len(replicas) != self._loop.replicas:
            if lost:
                self._loop.recreated_total += len(lost)
                names = ", ".join(f"{r.name} ({r.state.value}: {r.reason or '-'})" for r in lost)
                events.append(
                    ScalingEventRecord(
                        time=now,
                        from_replicas=len(replicas) - len(lost),
                        to_replicas=self._loop.replicas,
                        reason=f"replacing {names}",
                        trigger="reconcile",
                    )
                )
            leaving = [
                r for r in replicas if r.index is not None and r.index >= self._loop.replicas
            ]
            if leaving and workflow.patched(DRAIN_BEFORE_STOP_PATCH):
                await self._unroute(replicas, leaving, loads, events)
                events = []
            replicas = await self._replica_call(
                "ensure_endpoint_replicas", self._call(), list[ReplicaInfo]
            )
        self._replicas = replicas
        status = status_after(self._loop.replicas, replicas, self._loop.status, bool(lost))
        ready = sum(1 for r in replicas if r.state is ReplicaState.READY)
        reason = f"{ready}/{self._loop.replicas} replicas ready; {decision.reason}"
        await self._save(status, reason, replicas=replicas, loads=loads, events=events)

    async def _unroute(
        self,
        replicas: list[ReplicaInfo],
        leaving: list[ReplicaInfo],
        loads: dict[str, float],
        events: list[ScalingEventRecord],
    ) -> None:
        """Take replicas about to be stopped out of the routing table first, and give
        gateways the time to see it, so no new request goes to a stopping replica (the
        requests they already hold finish: replicas stop gracefully)."""
        staying = [r for r in replicas if r not in leaving]
        ready = sum(1 for r in staying if r.state is ReplicaState.READY)
        names = ", ".join(r.name for r in leaving)
        await self._save(
            status_after(self._loop.replicas, staying, self._loop.status, False),
            f"{ready}/{self._loop.replicas} replicas ready; draining {names}",
            replicas=staying,
            loads=loads,
            events=events,
        )
        await workflow.sleep(UNROUTE_GRACE)

    async def _observe(self) -> Observation | None:
        try:
            return await self._replica_call(
                "observe_endpoint",
                self._call(),
                Observation,
                limit=OBSERVE_TIMEOUT,
                retry=OBSERVE_RETRY,
            )
        except ActivityError as err:
            self._last_decision = f"observation failed: {failure_reason(err)}"
            return None

    async def _drain(self, request: DeleteEndpointRequest) -> None:
        """Unpublish, wait for in-flight requests (bounded), remove replicas, mark deleted."""
        self._loop.published = False
        await self._save(EndpointStatus.DELETING, "draining", guard=False)
        if self._prepared is not None:
            deadline = workflow.now() + timedelta(seconds=request.grace_s)
            while workflow.now() < deadline and self._loop.replicas > 0:
                observation = await self._observe()
                if observation is not None and observation.running + observation.waiting == 0:
                    break
                await workflow.sleep(timedelta(seconds=FAST_INTERVAL_S))
            await self._replica_call("delete_endpoint_replicas", self._call(0), list[str])
        self._loop.replicas = 0
        self._replicas = []
        await self._save(EndpointStatus.DELETED, "deleted", replicas=[], guard=False)
        self._done = True
