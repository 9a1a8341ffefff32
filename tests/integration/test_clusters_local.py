"""The `local` cluster end to end: the API starts `OnboardCluster` on a real Temporal dev
server, real workers discover this machine with psutil, the inventory lands in real
PostgreSQL, `MonitorCluster` keeps watching it, and `DeleteCluster` stops it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psutil
from temporalio.client import Client, WorkflowExecutionStatus

from tests.fixtures.stack import StartWorkers
from tests.integration.test_workflow_runs import wait_for_status
from workflows.contracts.common import SA_RESOURCE_ID, SA_RESOURCE_KIND
from workflows.queues import ALL_QUEUES, Queue


async def wait_for_cluster(
    api: httpx.AsyncClient, cluster_id: str, status: str, within: float = 45
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        response = await api.get(f"/api/v1/clusters/{cluster_id}")
        body: dict[str, Any] = response.json()
        if response.status_code == 200 and body["status"] == status:
            return body
        assert asyncio.get_running_loop().time() < deadline, (
            body.get("status"),
            body.get("status_reason"),
        )
        await asyncio.sleep(0.2)


async def onboard_local(api: httpx.AsyncClient, name: str = "local") -> dict[str, Any]:
    response = await api.post("/api/v1/clusters", json={"name": name, "kind": "local"})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


class TestLocalOnboarding:
    async def test_onboarding_reports_this_machine(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        await start_workers(ALL_QUEUES)
        started = await onboard_local(api)
        assert started["status"] == "onboarding"
        assert started["workflow_id"] == f"cluster-onboard-{started['id']}"

        body = await wait_for_cluster(api, started["id"], "available")
        assert body["kind"] == "local"
        assert body["platform"] == "local"
        capacity = body["capacity"]
        assert capacity["nodes"] == capacity["ready_nodes"] == 1
        assert capacity["cpu_cores"] == psutil.cpu_count()
        total_mb = psutil.virtual_memory().total // (1024 * 1024)
        assert abs(capacity["memory_mb"] - total_mb) <= 1
        assert 0 < capacity["allocatable_memory_mb"] <= capacity["memory_mb"]
        assert capacity["gpus"] == 0
        [node] = body["nodes"]
        assert node["status"] == "ready"
        assert node["accelerators"] == []
        assert [(e["previous_status"], e["status"]) for e in reversed(body["history"])] == [
            (None, "onboarding"),
            ("onboarding", "available"),
        ]
        assert body["workflow_id"] == f"cluster-monitor-{started['id']}"

        run = await wait_for_status(api, started["workflow_id"], "completed")
        assert [s["status"] for s in run["progress"]["steps"]] == ["completed"] * 6

    async def test_onboarding_and_monitor_carry_search_attributes(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, temporal_client: Client
    ) -> None:
        await start_workers(ALL_QUEUES)
        cluster = await onboard_local(api)
        await wait_for_cluster(api, cluster["id"], "available")
        for workflow_id in (f"cluster-onboard-{cluster['id']}", f"cluster-monitor-{cluster['id']}"):
            described = await temporal_client.get_workflow_handle(workflow_id).describe()
            attributes = described.typed_search_attributes
            assert attributes.get(SA_RESOURCE_KIND) == "cluster"
            assert attributes.get(SA_RESOURCE_ID) == cluster["id"]
        monitor = await temporal_client.get_workflow_handle(
            f"cluster-monitor-{cluster['id']}"
        ).describe()
        assert monitor.status == WorkflowExecutionStatus.RUNNING

    async def test_a_second_local_cluster_is_a_conflict(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        first = await onboard_local(api)
        response = await api.post("/api/v1/clusters", json={"name": "again", "kind": "local"})
        assert response.status_code == 409
        assert first["name"] in response.json()["detail"]

    async def test_a_taken_name_is_a_conflict(self, api: httpx.AsyncClient) -> None:
        await onboard_local(api, "gpu-farm")
        response = await api.post(
            "/api/v1/clusters", json={"name": "gpu-farm", "kind": "kubernetes"}
        )
        assert response.status_code == 409

    async def test_a_local_cluster_takes_no_credential(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            "/api/v1/clusters",
            json={
                "name": "x",
                "kind": "local",
                "credential_id": "00000000-0000-0000-0000-000000000001",
            },
        )
        assert response.status_code == 422

    async def test_cancelling_onboarding_leaves_nothing_behind(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        # No cluster pool: onboarding waits on its first provider call.
        await start_workers([Queue.ORCHESTRATION])
        cluster = await onboard_local(api)
        await wait_for_status(api, cluster["workflow_id"], "running")
        response = await api.post(f"/api/v1/workflows/{cluster['workflow_id']}/cancel")
        assert response.status_code == 202, response.text
        await wait_for_status(api, cluster["workflow_id"], "cancelled")
        assert (await api.get(f"/api/v1/clusters/{cluster['id']}")).status_code == 404
        listed = (await api.get("/api/v1/clusters", params={"include_deleted": True})).json()
        [row] = listed["items"]
        assert row["status"] == "deleted"
        assert "cancelled" in row["status_reason"]
        # The machine is free to be onboarded again.
        await onboard_local(api, "local-2")


class TestLocalLifecycle:
    async def test_refresh_runs_a_check_now(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, temporal_client: Client
    ) -> None:
        await start_workers(ALL_QUEUES)
        cluster = await onboard_local(api)
        await wait_for_cluster(api, cluster["id"], "available")
        monitor = f"cluster-monitor-{cluster['id']}"
        await wait_for_check(api, monitor, 1)
        response = await api.post(f"/api/v1/clusters/{cluster['id']}/refresh")
        assert response.status_code == 202, response.text
        await wait_for_check(api, monitor, 2)

    async def test_delete_stops_the_monitor_and_hides_the_cluster(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, temporal_client: Client
    ) -> None:
        await start_workers(ALL_QUEUES)
        cluster = await onboard_local(api)
        await wait_for_cluster(api, cluster["id"], "available")
        response = await api.delete(f"/api/v1/clusters/{cluster['id']}")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "deleting"
        assert response.json()["workflow_id"] == f"cluster-delete-{cluster['id']}"
        await wait_for_status(api, f"cluster-delete-{cluster['id']}", "completed")
        assert (await api.get(f"/api/v1/clusters/{cluster['id']}")).status_code == 404
        monitor = temporal_client.get_workflow_handle(f"cluster-monitor-{cluster['id']}")
        result = await asyncio.wait_for(monitor.result(), 30)
        assert result["checks"] >= 1
        assert (await api.get("/api/v1/clusters")).json()["total"] == 0

    async def test_deleting_while_onboarding_is_a_conflict(self, api: httpx.AsyncClient) -> None:
        cluster = await onboard_local(api)
        response = await api.delete(f"/api/v1/clusters/{cluster['id']}")
        assert response.status_code == 409
        assert f"cluster-onboard-{cluster['id']}" in response.json()["detail"]

    async def test_refresh_of_a_cluster_being_onboarded_is_a_conflict(
        self, api: httpx.AsyncClient
    ) -> None:
        cluster = await onboard_local(api)
        assert (await api.post(f"/api/v1/clusters/{cluster['id']}/refresh")).status_code == 409


async def wait_for_check(api: httpx.AsyncClient, workflow_id: str, checks: int) -> None:
    """Until the monitor's progress says it finished `checks` checks."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        body = (await api.get(f"/api/v1/workflows/{workflow_id}")).json()
        steps = (body.get("progress") or {}).get("steps") or []
        detail = steps[0].get("detail") or "" if steps else ""
        if detail.startswith("check ") and int(detail.split()[1].rstrip(":")) >= checks:
            return
        assert asyncio.get_running_loop().time() < deadline, (
            body.get("status"),
            body.get("status_reason"),
        )
        await asyncio.sleep(0.2)
