"""`DeployEndpoint` on the time-skipping test server: the autoscaling policy and its
windows in workflow time (minutes pass in a few loop iterations), scale to zero and wake,
the manual pin, policy updates, deletion, continue-as-new, a failed deploy, and replay of
fresh and recorded histories.

The orchestration activities are the real ones (real PostgreSQL: placement checks,
status and scaling events are written for real). The `cp-deploy` pool is replaced at
its boundary by `FakeCluster`, an in-memory replica set whose load the test sets:
real replica processes cannot follow a clock that jumps minutes ahead (the real
providers and the real loop are covered in `tests/integration/test_endpoints_local.py`).

Each test gets a test server of its own (a native binary that starts in moments). The
server skips time only while nothing holds its time lock, and every scheduled activity
and workflow task holds it until completed: a workflow left with work no worker will
ever take (its test's workers are gone) keeps time locked for good, even once terminated,
and from then on `env.sleep` waits in real time. On the shared session server one such
leftover (a delete update returns before the run's last bookkeeping activity), from this
file or any other, turned a 300 s window into 300 s of wall time. The tests also delete
their endpoints and await the workflow's end, so they leave nothing pending.

The first step after a deploy is one and a half reconcile intervals, later steps whole
intervals: each skip then ends midway between two iterations, after exactly the
iterations it covers have written their state (time stands still while an iteration's
activities run), so the checks after it need no polling, and a step of minutes costs
only the real work of its few iterations.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlmodel import col, select
from temporalio import activity
from temporalio.client import (
    WorkflowHandle,
    WorkflowHistory,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from control_plane.clusters.tables import Cluster
from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.core.storage import FileObjectStore
from control_plane.core.temporal import data_converter
from control_plane.credentials.crypto import load_vault
from control_plane.devstack.services import venv_binary
from control_plane.endpoints.tables import Endpoint, EndpointReplica, ScalingEvent
from tests.fixtures.identity import IdentityFactory
from workers.main import _workflow_runner, build_workers
from workers.registry import POOLS, WorkerResources
from workflows.contracts.autoscale import AutoscalePolicy
from workflows.contracts.endpoints import (
    DELETE_UPDATE,
    SCALE_SIGNAL,
    SET_AUTOSCALE_UPDATE,
    STATE_QUERY,
    WAKE_SIGNAL,
    DeleteEndpointRequest,
    DeployEndpointRequest,
    EndpointStateView,
    EndpointStatus,
    EndpointTarget,
    Observation,
    ReplicaCall,
    ReplicaInfo,
    ReplicaLoad,
    ReplicaState,
    ScaleRequest,
    endpoint_workflow_id,
)
from workflows.queues import QUEUE_PREFIX_MEMO, Queue, task_queue

HISTORIES = Path(__file__).parent / "histories"
ORCHESTRATION_WORKFLOWS = list(POOLS[Queue.ORCHESTRATION].workflows)


@dataclass
class FakeCluster:
    """The deploy pool's activities over an in-memory replica set. `load` is the number
    of requests in flight, spread over the ready replicas."""

    replicas: dict[str, ReplicaInfo] = field(default_factory=dict)
    load: float = 0.0
    calls: list[str] = field(default_factory=list)

    def _names(self, call: ReplicaCall) -> list[str]:
        return [f"{call.spec.name}-{i}" for i in range(call.spec.replicas)]

    @activity.defn(name="ensure_endpoint_replicas")
    async def ensure(self, call: ReplicaCall) -> list[ReplicaInfo]:
        self.calls.append(f"ensure {call.spec.replicas}")
        wanted = self._names(call)
        for name in list(self.replicas):
            if name not in wanted or self.replicas[name].state is ReplicaState.EXITED:
                del self.replicas[name]
        for index, name in enumerate(wanted):
            self.replicas.setdefault(
                name,
                ReplicaInfo(
                    name=name, index=index, state=ReplicaState.READY, url=f"http://fake/{name}"
                ),
            )
        return list(self.replicas.values())

    @activity.defn(name="wait_endpoint_ready")
    async def wait_ready(self, call: ReplicaCall) -> list[ReplicaInfo]:
        return await self.ensure(call)

    @activity.defn(name="observe_endpoint")
    async def observe(self, call: ReplicaCall) -> Observation:
        replicas = list(self.replicas.values())
        ready = [r for r in replicas if r.state is ReplicaState.READY]
        share = self.load / len(ready) if ready else 0.0
        return Observation(
            replicas=replicas, loads=[ReplicaLoad(name=r.name, running=share) for r in ready]
        )

    @activity.defn(name="delete_endpoint_replicas")
    async def delete(self, call: ReplicaCall) -> list[str]:
        self.calls.append("delete")
        removed = sorted(self.replicas)
        self.replicas.clear()
        return removed

    def activities(self) -> list[Any]:
        return [self.ensure, self.wait_ready, self.observe, self.delete]


@dataclass
class Stack:
    env: WorkflowEnvironment
    sessions: Any
    prefix: str
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    cluster_id: uuid.UUID
    fake: FakeCluster

    async def endpoint(self, name: str = "ep") -> uuid.UUID:
        async with session_scope(self.sessions) as session:
            row = Endpoint(
                tenant_id=self.tenant_id,
                project_id=self.project_id,
                name=name,
                requested_cluster_id=self.cluster_id,
                engine="simulator",
                engine_args={"ttft_ms": 0},
            )
            session.add(row)
        return row.id

    async def deploy(
        self,
        policy: AutoscalePolicy,
        *,
        initial: int = 1,
        interval: float = 10.0,
        max_iterations: int = 500,
    ) -> tuple[uuid.UUID, WorkflowHandle[Any, Any]]:
        endpoint_id = await self.endpoint(f"ep-{uuid.uuid4().hex[:6]}")
        request = DeployEndpointRequest(
            target=EndpointTarget(
                endpoint_id=endpoint_id, tenant_id=self.tenant_id, project_id=self.project_id
            ),
            initial_replicas=initial,
            autoscale=policy,
            reconcile_interval_s=interval,
            max_iterations=max_iterations,
        )
        handle = await self.env.client.start_workflow(
            "DeployEndpoint",
            request,
            id=endpoint_workflow_id(endpoint_id),
            task_queue=task_queue(Queue.ORCHESTRATION, self.prefix),
            memo={QUEUE_PREFIX_MEMO: self.prefix},
        )
        return endpoint_id, handle

    async def row(self, endpoint_id: uuid.UUID) -> Endpoint:
        async with session_scope(self.sessions) as session:
            row = await session.get(Endpoint, endpoint_id)
        assert row is not None
        return row

    async def events(self, endpoint_id: uuid.UUID) -> list[ScalingEvent]:
        async with session_scope(self.sessions) as session:
            rows = await session.exec(
                select(ScalingEvent)
                .where(ScalingEvent.endpoint_id == endpoint_id)
                .order_by(col(ScalingEvent.time), col(ScalingEvent.created_at))
            )
            return list(rows.all())

    async def wait_for(
        self,
        endpoint_id: uuid.UUID,
        status: EndpointStatus,
        desired: int | None = None,
        *,
        within_s: float = 20.0,
    ) -> Endpoint:
        """Poll (in real time) until the endpoint shows `status` (x `desired`)."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            row = await self.row(endpoint_id)
            if row.status == status.value and desired in (None, row.replicas_desired):
                return row
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"endpoint is {row.status} x{row.replicas_desired}: {row.status_reason}"
                )
            await asyncio.sleep(0.025)

    async def delete(self, handle: WorkflowHandle[Any, Any]) -> None:
        """Delete the endpoint and wait for the workflow's end: nothing is left pending."""
        await handle.execute_update(DELETE_UPDATE, DeleteEndpointRequest(grace_s=0))
        result = await handle.result()
        assert result["status"] == "deleted"

    async def state(self, handle: WorkflowHandle[Any, Any]) -> EndpointStateView:
        view: EndpointStateView = await handle.query(STATE_QUERY, result_type=EndpointStateView)
        return view

    async def tick(self, seconds: float) -> None:
        """Advance workflow time by `seconds`, running every timer due on the way.

        The skip returns once the server's clock got there, and time stands still while
        the workflow's activities run, so the iterations it covered have written their
        state when it lands between two of them (see the module docstring). On a loaded
        machine the skip call can outlast its RPC deadline or lose its HTTP/2 stream; the
        skip goes on in the server regardless, so then wait for its clock to get there."""
        target = await self.env.get_current_time() + timedelta(seconds=seconds)
        try:
            await self.env.sleep(timedelta(seconds=seconds))
        except RPCError as err:
            if "Timeout" not in err.message and "h2 protocol" not in err.message:
                raise
            while True:
                left = (target - await self.env.get_current_time()).total_seconds()
                if left <= 0:
                    break
                await asyncio.sleep(min(1.0, left))
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture(loop_scope="session")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A test server of this test's own: time skipping no other test can lock up."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"),
        data_converter=data_converter(),
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    skipping_env: WorkflowEnvironment, settings: Settings, identities: IdentityFactory
) -> AsyncIterator[Stack]:
    engine = create_engine(settings.database)
    sessions = create_sessionmaker(engine)
    prefix = f"e{uuid.uuid4().hex[:8]}-"
    tenant = await identities.tenant()
    project = await identities.project(tenant)
    async with session_scope(sessions) as session:
        cluster = Cluster(
            tenant_id=tenant.id,
            name="local",
            kind="local",
            server_url=f"local://{uuid.uuid4().hex[:6]}",
            namespace="cp-test",
            status="available",
        )
        session.add(cluster)
    resources = WorkerResources(
        sessions=sessions,
        vault=load_vault(settings),
        data_dir=settings.data_dir,
        objects=FileObjectStore(settings.objects_dir),
        models=settings.models,
    )
    fake = FakeCluster()
    workers: list[Worker] = build_workers(
        skipping_env.client, resources, [Queue.ORCHESTRATION], prefix=prefix
    )
    workers.append(
        Worker(
            skipping_env.client,
            task_queue=task_queue(Queue.DEPLOY, prefix),
            activities=fake.activities(),
        )
    )
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield Stack(
            env=skipping_env,
            sessions=sessions,
            prefix=prefix,
            tenant_id=tenant.id,
            project_id=project.id,
            cluster_id=cluster.id,
            fake=fake,
        )
    finally:
        await asyncio.gather(*(w.shutdown() for w in workers))
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()


class TestAutoscalingInWorkflowTime:
    async def test_up_at_once_down_after_the_stabilization_window(self, stack: Stack) -> None:
        interval, window = 60.0, 300.0
        policy = AutoscalePolicy(
            min_replicas=1,
            max_replicas=4,
            target_concurrency_per_replica=2,
            scale_up_window_s=0,
            scale_up_max_step=4,
            scale_down_stabilization_s=window,
        )
        endpoint_id, handle = await stack.deploy(policy, interval=interval)
        row = await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)
        assert row.published
        assert row.cluster_id == stack.cluster_id

        stack.fake.load = 7  # ceil(7 / 2) = 4
        await stack.tick(1.5 * interval)  # the first look: up at once, no window
        row = await stack.row(endpoint_id)
        assert (row.status, row.replicas_desired) == ("running", 4), row.status_reason
        assert len(stack.fake.replicas) == 4

        stack.fake.load = 0
        await stack.tick(interval)  # the next look sees no load: 1 wanted from here on
        row = await stack.row(endpoint_id)
        assert row.replicas_desired == 4, row.status_reason
        assert "hold at 4" in row.status_reason
        assert f"stabilizing for {window:g}s" in row.status_reason
        await stack.tick(window - interval)  # 4 more looks, all within the window
        row = await stack.row(endpoint_id)
        assert row.replicas_desired == 4, row.status_reason
        assert f"stabilizing for {window:g}s" in row.status_reason
        await stack.tick(interval)  # the first look a whole window after the load went
        row = await stack.row(endpoint_id)
        assert (row.status, row.replicas_desired) == ("running", 1), row.status_reason
        assert len(stack.fake.replicas) == 1

        events = await stack.events(endpoint_id)
        moves = [(e.from_replicas, e.to_replicas, e.trigger, e.metric) for e in events]
        assert moves == [(1, 4, "autoscale", 7), (4, 1, "autoscale", 0)]
        up, down = events
        assert f"at most 1 wanted over the last {window:g}s" in down.reason
        # The load was first seen gone one interval after the scale-up and the window
        # runs from that look; on top, only the real time the looks took (time stands
        # still while activities run, and runs in real time between the test's skips).
        gap = (down.time - up.time).total_seconds()
        assert interval + window <= gap < interval + window + interval / 2
        async with session_scope(stack.sessions) as session:
            replicas = (
                await session.exec(
                    select(EndpointReplica).where(EndpointReplica.endpoint_id == endpoint_id)
                )
            ).all()
        assert [r.state for r in replicas] == ["ready"]
        await stack.delete(handle)

    async def test_scale_to_zero_when_idle_and_wake(self, stack: Stack) -> None:
        interval, idle_after = 60.0, 300.0
        policy = AutoscalePolicy(
            min_replicas=0,
            max_replicas=2,
            target_concurrency_per_replica=4,
            scale_down_stabilization_s=60,
            scale_to_zero_after_s=idle_after,
        )
        endpoint_id, handle = await stack.deploy(policy, interval=interval)
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)

        await stack.tick(1.5 * interval)  # the first look: no load, idle from here on
        await stack.tick(idle_after - interval)  # 4 more looks: idle for 240 s only
        row = await stack.row(endpoint_id)
        assert (row.status, row.replicas_desired) == ("running", 1), row.status_reason
        assert f"scale to zero after {idle_after:g}s" in row.status_reason
        assert len(stack.fake.replicas) == 1
        await stack.tick(interval)  # idle for the whole 300 s: to zero
        idle = await stack.row(endpoint_id)
        assert (idle.status, idle.replicas_desired) == ("idle", 0), idle.status_reason
        assert idle.published, "an idle endpoint stays routable: the gateway wakes it"
        assert stack.fake.replicas == {}
        assert (await stack.state(handle)).published

        await handle.signal(WAKE_SIGNAL)
        row = await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)
        assert row.published
        assert len(stack.fake.replicas) == 1
        events = await stack.events(endpoint_id)
        assert [(e.from_replicas, e.to_replicas, e.trigger, e.metric) for e in events] == [
            (1, 0, "autoscale", 0),
            (0, 1, "wake", 1),  # the wake counts as one request waiting at the gateway
        ]
        # Idle from the first look on; to zero at the first look 300 s after it.
        idle_for = re.search(r"scale to zero 1 -> 0: idle for ([0-9.]+)s", events[0].reason)
        assert idle_for is not None, events[0].reason
        assert idle_after <= float(idle_for[1]) < idle_after + interval / 2
        await stack.delete(handle)


class TestMessages:
    async def test_manual_scale_pins_until_cleared(self, stack: Stack) -> None:
        policy = AutoscalePolicy(min_replicas=1, max_replicas=3, scale_down_stabilization_s=0)
        endpoint_id, handle = await stack.deploy(policy)
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)

        await handle.signal(SCALE_SIGNAL, ScaleRequest(replicas=3))
        row = await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=3)
        assert row.manual_replicas == 3
        for _ in range(6):
            await stack.tick(10)
        assert (await stack.row(endpoint_id)).replicas_desired == 3
        assert (await stack.state(handle)).manual_replicas == 3

        await handle.signal(SCALE_SIGNAL, ScaleRequest(replicas=None))
        row = await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)
        assert row.manual_replicas is None
        triggers = [e.trigger for e in await stack.events(endpoint_id)]
        assert triggers == ["manual", "autoscale"]
        await stack.delete(handle)

    async def test_set_autoscale_validates_and_applies(self, stack: Stack) -> None:
        endpoint_id, handle = await stack.deploy(AutoscalePolicy(min_replicas=1, max_replicas=1))
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)

        with pytest.raises(WorkflowUpdateFailedError):
            await handle.execute_update(
                SET_AUTOSCALE_UPDATE, {"min_replicas": 3, "max_replicas": 2}
            )
        applied = await handle.execute_update(
            SET_AUTOSCALE_UPDATE,
            AutoscalePolicy(min_replicas=2, max_replicas=5),
            result_type=AutoscalePolicy,
        )
        assert applied.min_replicas == 2
        row = await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=2)
        assert row.autoscale["max_replicas"] == 5
        await stack.delete(handle)

    async def test_delete_drains_and_removes_replicas(self, stack: Stack) -> None:
        endpoint_id, handle = await stack.deploy(
            AutoscalePolicy(min_replicas=2, max_replicas=2), initial=2
        )
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=2)
        stack.fake.load = 1  # in flight: the drain waits (up to the grace period)
        update = await handle.start_update(
            DELETE_UPDATE,
            DeleteEndpointRequest(grace_s=30),
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
        )
        row = await stack.wait_for(endpoint_id, EndpointStatus.DELETING)
        assert not row.published
        assert len(stack.fake.replicas) == 2
        stack.fake.load = 0
        await stack.tick(2)
        assert await update.result() == "deleted"
        result = await handle.result()
        assert result["status"] == "deleted"
        row = await stack.row(endpoint_id)
        assert (row.status, row.replicas_desired, row.published) == ("deleted", 0, False)
        assert stack.fake.replicas == {}

    async def test_continue_as_new_carries_the_state(self, stack: Stack) -> None:
        endpoint_id, handle = await stack.deploy(
            AutoscalePolicy(min_replicas=1, max_replicas=3), max_iterations=3
        )
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=1)
        first_run = (await handle.describe()).run_id
        await handle.signal(SCALE_SIGNAL, ScaleRequest(replicas=2))
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING, desired=2)
        latest = stack.env.client.get_workflow_handle(handle.id)
        for _ in range(20):
            await stack.tick(10)
            if (await latest.describe()).run_id != first_run:
                break
        assert (await latest.describe()).run_id != first_run
        state = await stack.state(latest)
        assert (state.manual_replicas, state.replicas_desired, state.published) == (2, 2, True)
        assert (await stack.row(endpoint_id)).status == "running"
        await stack.delete(latest)

    async def test_engine_args_refused_at_deploy_fail_the_endpoint(self, stack: Stack) -> None:
        endpoint_id, handle = await stack.deploy(AutoscalePolicy())
        async with session_scope(stack.sessions) as session:
            row = await session.get(Endpoint, endpoint_id)
            assert row is not None
            row.engine_args = {"no_such_setting": 1}
            session.add(row)
        result = await handle.result()
        assert result["status"] == "failed"
        row = await stack.row(endpoint_id)
        assert row.status == "failed"
        assert "no_such_setting" in row.status_reason


class TestReplay:
    async def test_fresh_history_replays(self, stack: Stack, tmp_path: Path) -> None:
        policy = AutoscalePolicy(min_replicas=0, max_replicas=2, scale_to_zero_after_s=30)
        endpoint_id, handle = await stack.deploy(policy, interval=5)
        await stack.wait_for(endpoint_id, EndpointStatus.RUNNING)
        stack.fake.load = 5
        await stack.tick(5)
        await handle.signal(SCALE_SIGNAL, ScaleRequest(replicas=1))
        await stack.tick(5)
        await handle.signal(SCALE_SIGNAL, ScaleRequest(replicas=None))
        stack.fake.load = 0
        await stack.tick(40)
        await handle.execute_update(DELETE_UPDATE, DeleteEndpointRequest(grace_s=0))
        await handle.result()
        history = await handle.fetch_history()
        (tmp_path / "deploy_endpoint.json").write_text(history.to_json())
        await Replayer(
            workflows=ORCHESTRATION_WORKFLOWS,
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)

    @pytest.mark.parametrize(
        "path", sorted(HISTORIES.glob("*endpoint*.json")), ids=lambda p: p.name
    )
    async def test_recorded_histories_replay(self, path: Path) -> None:
        text = await asyncio.to_thread(path.read_text)
        history = WorkflowHistory.from_json(path.stem, json.loads(text))
        await Replayer(
            workflows=ORCHESTRATION_WORKFLOWS,
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)
