"""Cluster workflows on the time-skipping test server with the real activities (real
PostgreSQL; the Kubernetes API is the stand-in server of `tests.fixtures.kube`, since
none can run here): `MonitorCluster` status transitions across an outage, and replay of
`OnboardCluster` histories (fresh and recorded) to guard determinism."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import TypeAdapter
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from control_plane.clusters.tables import Cluster
from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.core.storage import FileObjectStore
from control_plane.core.temporal import data_converter
from control_plane.credentials.crypto import load_vault
from control_plane.credentials.schemas import CredentialCreate
from control_plane.credentials.service import CredentialService
from control_plane.identity.permissions import Principal
from tests.fixtures.identity import IdentityFactory
from tests.fixtures.kube import KubeApiServer, make_node
from workers.main import _workflow_runner, build_workers
from workers.registry import POOLS, WorkerResources
from workflows.clusters import next_status
from workflows.contracts.clusters import (
    STOP_SIGNAL,
    ClusterKind,
    ClusterStatus,
    ClusterTarget,
    ConnectionInfo,
    HealthReport,
    Inventory,
    MonitorClusterRequest,
    MonitorSettings,
    NodeInfo,
    OnboardClusterRequest,
    Platform,
)
from workflows.queues import ALL_QUEUES, QUEUE_PREFIX_MEMO, Queue, task_queue

HISTORIES = Path(__file__).parent / "histories"
ORCHESTRATION_WORKFLOWS = list(POOLS[Queue.ORCHESTRATION].workflows)


@dataclass
class Stack:
    env: WorkflowEnvironment
    sessions: async_sessionmaker[AsyncSession]
    prefix: str
    tenant_id: uuid.UUID
    principal: Principal
    settings: Settings

    async def cluster(self, **fields: object) -> Cluster:
        async with session_scope(self.sessions) as session:
            row = Cluster(tenant_id=self.tenant_id, namespace="cp-test", **fields)  # type: ignore[arg-type]
            session.add(row)
        return row

    async def reload(self, cluster_id: uuid.UUID) -> Cluster:
        async with session_scope(self.sessions) as session:
            row = await session.get(Cluster, cluster_id)
        assert row is not None
        return row

    async def wait_for(
        self, cluster_id: uuid.UUID, status: ClusterStatus, reason_has: str = ""
    ) -> Cluster:
        for _ in range(300):
            row = await self.reload(cluster_id)
            if row.status == status.value and reason_has in row.status_reason:
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"cluster is {row.status}: {row.status_reason}")


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    time_skipping_env: WorkflowEnvironment, settings: Settings, identities: IdentityFactory
) -> AsyncIterator[Stack]:
    engine: AsyncEngine = create_engine(settings.database)
    sessions = create_sessionmaker(engine)
    prefix = f"w{uuid.uuid4().hex[:8]}-"
    tenant = await identities.tenant()
    admin = await identities.user(tenant, admin=True)
    resources = WorkerResources(
        sessions=sessions,
        vault=load_vault(settings),
        data_dir=settings.data_dir,
        objects=FileObjectStore(settings.objects_dir),
        models=settings.models,
    )
    workers: list[Worker] = build_workers(
        time_skipping_env.client, resources, ALL_QUEUES, prefix=prefix
    )
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield Stack(
            env=time_skipping_env,
            sessions=sessions,
            prefix=prefix,
            tenant_id=tenant.id,
            principal=Principal(tenant_id=tenant.id, user_id=admin.user.id, is_tenant_admin=True),
            settings=settings,
        )
    finally:
        await asyncio.gather(*(w.shutdown() for w in workers))
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()


async def kubeconfig_credential(stack: Stack, kube: KubeApiServer) -> uuid.UUID:
    async with session_scope(stack.sessions) as session:
        created = await CredentialService(session, load_vault(stack.settings)).create(
            stack.principal,
            TypeAdapter(CredentialCreate).validate_python(
                {"name": "kube", "provider": "kubeconfig", "kubeconfig": kube.kubeconfig()}
            ),
            project_id=None,
        )
    return created.id


class TestMonitorTransitions:
    async def test_outage_goes_unreachable_after_the_threshold_then_recovers(
        self, stack: Stack, kube_api: KubeApiServer
    ) -> None:
        kube_api.nodes.append(make_node("node-a"))
        credential_id = await kubeconfig_credential(stack, kube_api)
        row = await stack.cluster(
            name="watched",
            kind="kubernetes",
            credential_id=credential_id,
            server_url=kube_api.url,
            status="available",
        )
        target = ClusterTarget(
            cluster_id=row.id,
            tenant_id=stack.tenant_id,
            kind=ClusterKind.KUBERNETES,
            credential_id=credential_id,
            namespace="cp-test",
        )
        interval = timedelta(seconds=60)
        handle = await stack.env.client.start_workflow(
            "MonitorCluster",
            MonitorClusterRequest(
                cluster=target, monitor=MonitorSettings(interval_seconds=60, failure_threshold=2)
            ),
            id=f"cluster-monitor-{row.id}",
            task_queue=task_queue(Queue.ORCHESTRATION, stack.prefix),
            memo={QUEUE_PREFIX_MEMO: stack.prefix},
        )
        seen = await stack.wait_for(row.id, ClusterStatus.AVAILABLE, "1 of 1 nodes ready")
        assert seen.node_count == 1

        kube_api.stop()
        await stack.env.sleep(interval)
        await stack.wait_for(row.id, ClusterStatus.AVAILABLE, "check 1/2 failed")
        await stack.env.sleep(interval)
        down = await stack.wait_for(row.id, ClusterStatus.UNREACHABLE)
        assert "2 consecutive failed checks" in down.status_reason

        kube_api.start()
        await stack.env.sleep(interval)
        await stack.wait_for(row.id, ClusterStatus.AVAILABLE)

        with kube_api.lock:
            kube_api.nodes.append(make_node("node-b", cordoned=True))
        await stack.env.sleep(interval)
        degraded = await stack.wait_for(row.id, ClusterStatus.DEGRADED)
        assert "node-b" in degraded.status_reason

        await handle.signal(STOP_SIGNAL)
        result = await handle.result()
        assert result["checks"] == 5

    async def test_continues_as_new_carrying_its_state(self, stack: Stack) -> None:
        row = await stack.cluster(
            name="long", kind="local", server_url="local://long", status="available"
        )
        target = ClusterTarget(cluster_id=row.id, tenant_id=stack.tenant_id, kind=ClusterKind.LOCAL)
        handle = await stack.env.client.start_workflow(
            "MonitorCluster",
            MonitorClusterRequest(
                cluster=target, monitor=MonitorSettings(interval_seconds=5), checks_per_run=2
            ),
            id=f"cluster-monitor-{row.id}",
            task_queue=task_queue(Queue.ORCHESTRATION, stack.prefix),
            memo={QUEUE_PREFIX_MEMO: stack.prefix},
        )
        first_run = (await handle.describe()).run_id
        for _ in range(3):
            await stack.env.sleep(timedelta(seconds=6))
        latest = stack.env.client.get_workflow_handle(handle.id)
        assert (await latest.describe()).run_id != first_run
        await latest.signal(STOP_SIGNAL)
        result = await latest.result()
        # Checks are counted across runs.
        assert result["checks"] >= 3
        assert result["status"] == "available"

    async def test_a_deleted_cluster_ends_its_monitor(self, stack: Stack) -> None:
        row = await stack.cluster(
            name="gone", kind="local", server_url="local://gone", status="deleting"
        )
        target = ClusterTarget(cluster_id=row.id, tenant_id=stack.tenant_id, kind=ClusterKind.LOCAL)
        result = await stack.env.client.execute_workflow(
            "MonitorCluster",
            MonitorClusterRequest(cluster=target),
            id=f"cluster-monitor-{row.id}",
            task_queue=task_queue(Queue.ORCHESTRATION, stack.prefix),
            memo={QUEUE_PREFIX_MEMO: stack.prefix},
        )
        assert result["checks"] == 1
        assert (await stack.reload(row.id)).status == "deleting"


def report(*ready: bool, reachable: bool = True) -> HealthReport:
    nodes = [
        NodeInfo(
            name=f"n{i}",
            ready=r,
            reason="" if r else "cordoned",
            cpu_cores=4,
            memory_mb=1024,
            allocatable_cpu=4,
            allocatable_memory_mb=1024,
        )
        for i, r in enumerate(ready)
    ]
    inventory = Inventory(
        connection=ConnectionInfo(server_url="x", platform=Platform.KUBERNETES, version="v1"),
        nodes=nodes,
    )
    return HealthReport(
        reachable=reachable,
        reason="" if reachable else "connection refused",
        inventory=inventory if reachable else None,
        checked_at=datetime.now(UTC),
    )


class TestNextStatus:
    def test_all_nodes_ready_is_available(self) -> None:
        assert next_status(ClusterStatus.UNREACHABLE, 4, report(True, True), 3) == (
            ClusterStatus.AVAILABLE,
            0,
            "2 of 2 nodes ready",
        )

    def test_a_node_not_ready_is_degraded_and_named(self) -> None:
        status, failures, reason = next_status(ClusterStatus.AVAILABLE, 0, report(True, False), 3)
        assert (status, failures) == (ClusterStatus.DEGRADED, 0)
        assert reason == "1 of 2 nodes ready (n1: cordoned)"

    def test_no_nodes_is_degraded(self) -> None:
        assert next_status(ClusterStatus.AVAILABLE, 0, report(), 3)[0] is ClusterStatus.DEGRADED

    def test_a_failure_below_the_threshold_keeps_the_status(self) -> None:
        status, failures, reason = next_status(
            ClusterStatus.DEGRADED, 1, report(reachable=False), 3
        )
        assert (status, failures) == (ClusterStatus.DEGRADED, 2)
        assert reason == "check 2/3 failed: connection refused"

    def test_the_threshold_makes_it_unreachable(self) -> None:
        status, failures, _ = next_status(ClusterStatus.AVAILABLE, 2, report(reachable=False), 3)
        assert (status, failures) == (ClusterStatus.UNREACHABLE, 3)


class TestReplay:
    async def test_fresh_onboarding_history_replays(self, stack: Stack, tmp_path: Path) -> None:
        row = await stack.cluster(
            name="local", kind="local", server_url="local://replay", status="onboarding"
        )
        target = ClusterTarget(cluster_id=row.id, tenant_id=stack.tenant_id, kind=ClusterKind.LOCAL)
        workflow_id = f"cluster-onboard-{row.id}"
        result = await stack.env.client.execute_workflow(
            "OnboardCluster",
            OnboardClusterRequest(cluster=target),
            id=workflow_id,
            task_queue=task_queue(Queue.ORCHESTRATION, stack.prefix),
            memo={QUEUE_PREFIX_MEMO: stack.prefix},
        )
        assert result["status"] == "available"
        await stack.env.client.get_workflow_handle(f"cluster-monitor-{row.id}").signal(STOP_SIGNAL)
        history = await stack.env.client.get_workflow_handle(workflow_id).fetch_history()
        # Kept next to the test's files, for refreshing the recorded histories.
        (tmp_path / "onboard_cluster_local.json").write_text(history.to_json())
        await Replayer(
            workflows=ORCHESTRATION_WORKFLOWS,
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)

    @pytest.mark.parametrize("path", sorted(HISTORIES.glob("*cluster*.json")), ids=lambda p: p.name)
    async def test_recorded_histories_replay(self, path: Path) -> None:
        text = await asyncio.to_thread(path.read_text)
        history = WorkflowHistory.from_json(path.stem, json.loads(text))
        await Replayer(
            workflows=ORCHESTRATION_WORKFLOWS,
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)
