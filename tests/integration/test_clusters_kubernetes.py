"""Kubernetes clusters end to end: a kubeconfig credential and a cluster created through
the API, `OnboardCluster` run by real workers on a real Temporal dev server, results in
real PostgreSQL.

No Kubernetes API server can run here: the cluster is the stand-in server of
`tests.fixtures.kube`, which answers the real REST paths and JSON shapes, so the
provider's official client, urllib3 and the kubeconfig loader run unchanged; only the
network peer is replaced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any

import httpx
import pytest
from sqlmodel import col, func, select

from control_plane.clusters.tables import Cluster
from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from tests.fixtures.kube import KubeApiServer, make_node
from tests.fixtures.stack import StartWorkers
from tests.integration.test_clusters_local import wait_for_cluster
from tests.integration.test_workflow_runs import wait_for_status
from workflows.queues import ALL_QUEUES

GPU_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/cuda.driver.major": "580",
    "nvidia.com/cuda.driver.minor": "159",
    "nvidia.com/cuda.driver.rev": "04",
    "nvidia.com/cuda.runtime.major": "13",
    "nvidia.com/cuda.runtime.minor": "0",
}


def with_nodes(kube: KubeApiServer) -> None:
    with kube.lock:
        kube.nodes[:] = [
            make_node("cpu-1", cpu="16", memory="64Gi"),
            make_node(
                "gpu-1",
                cpu="96",
                memory="1024Gi",
                extended={"nvidia.com/gpu": "8"},
                labels=GPU_LABELS,
            ),
        ]


async def store_kubeconfig(api: httpx.AsyncClient, kubeconfig: str, name: str = "kube") -> str:
    response = await api.post(
        "/api/v1/credentials",
        json={"name": name, "provider": "kubeconfig", "kubeconfig": kubeconfig},
    )
    assert response.status_code == 201, response.text
    credential_id: str = response.json()["id"]
    return credential_id


async def create_cluster(
    api: httpx.AsyncClient, credential_id: str, name: str = "prod", **settings: int
) -> httpx.Response:
    body: dict[str, Any] = {"name": name, "kind": "kubernetes", "credential_id": credential_id}
    if settings:
        body["settings"] = settings
    return await api.post("/api/v1/clusters", json=body)


def hold_after_namespace_created(
    kube: KubeApiServer,
) -> tuple[threading.Event, threading.Event]:
    """The first namespace creation happens, then its answer waits for `release`."""
    created = threading.Event()
    release = threading.Event()
    original = kube._create_namespace

    def create_then_hold(body: Any) -> Any:
        answer = original(body)
        if not created.is_set():
            created.set()
            release.wait(30)
        return answer

    kube._create_namespace = create_then_hold  # type: ignore[method-assign]
    return created, release


def version_calls(kube: KubeApiServer) -> int:
    return sum(1 for r in kube.requests if r.method == "GET" and r.path.rstrip("/") == "/version")


class TestKubernetesOnboarding:
    async def test_onboarding_discovers_nodes_and_prepares_the_namespace(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        with_nodes(kube_api)
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        response = await create_cluster(api, credential)
        assert response.status_code == 202, response.text
        cluster = response.json()
        assert cluster["server_url"] == kube_api.url
        assert cluster["namespace"] == f"cp-{cluster['id'].replace('-', '')[:12]}"

        body = await wait_for_cluster(api, cluster["id"], "available")
        assert body["platform"] == "kubernetes"
        assert body["version"] == "v1.31.2"
        capacity = body["capacity"]
        assert capacity["nodes"] == 2
        assert capacity["cpu_cores"] == 112
        assert capacity["gpus"] == capacity["allocatable_gpus"] == 8
        assert capacity["gpu_memory_mb"] == 8 * 81559
        gpu_node = next(n for n in body["nodes"] if n["name"] == "gpu-1")
        [accelerator] = gpu_node["accelerators"]
        assert accelerator["vendor"] == "nvidia"
        assert accelerator["model"] == "NVIDIA-H100-80GB-HBM3"
        assert accelerator["driver_version"] == "580.159.04"
        assert accelerator["cuda_version"] == "13.0"
        namespace = kube_api.namespaces[cluster["namespace"]]
        assert namespace["metadata"]["labels"]["cp/cluster"] == cluster["id"]
        assert (cluster["namespace"], "control-plane") in kube_api.service_accounts

    async def test_placement_ranks_the_cluster_with_free_gpus(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        with_nodes(kube_api)
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        cluster = (await create_cluster(api, credential)).json()
        await wait_for_cluster(api, cluster["id"], "available")
        fits = await api.get(
            "/api/v1/clusters/recommendations", params={"memory_mb": 150_000, "replicas": 4}
        )
        assert fits.status_code == 200, fits.text
        [entry] = fits.json()["items"]
        assert entry["fits"] is True
        assert entry["replicas_possible"] == 4
        too_big = await api.get(
            "/api/v1/clusters/recommendations", params={"memory_mb": 150_000, "replicas": 5}
        )
        [entry] = too_big.json()["items"]
        assert entry["fits"] is False
        assert entry["reason"].startswith("does not fit")

    async def test_a_cluster_without_ready_nodes_is_onboarded_degraded(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        cluster = (await create_cluster(api, credential)).json()
        body = await wait_for_cluster(api, cluster["id"], "degraded")
        assert "no nodes" in body["status_reason"]
        await wait_for_status(api, cluster["workflow_id"], "completed")

    async def test_same_api_server_twice_is_a_conflict(
        self, api: httpx.AsyncClient, kube_api: KubeApiServer
    ) -> None:
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        assert (await create_cluster(api, credential)).status_code == 202
        again = await create_cluster(api, credential, name="prod-again")
        assert again.status_code == 409
        assert "prod" in again.json()["detail"]

    async def test_kubeconfig_without_a_usable_context_is_rejected(
        self, api: httpx.AsyncClient, kube_api: KubeApiServer
    ) -> None:
        broken = kube_api.kubeconfig().replace("current-context: ", "current-context: missing-")
        credential = await store_kubeconfig(api, broken)
        response = await create_cluster(api, credential)
        assert response.status_code == 422
        assert "cannot be used" in response.json()["detail"]
        assert (await api.get("/api/v1/clusters")).json()["total"] == 0

    async def test_a_credential_of_another_provider_is_rejected(
        self, api: httpx.AsyncClient
    ) -> None:
        response = await api.post(
            "/api/v1/credentials",
            json={"name": "oai", "provider": "openai", "api_key": "sk-not-a-kubeconfig"},
        )
        cluster = await create_cluster(api, response.json()["id"])
        assert cluster.status_code == 422
        assert "needs a kubeconfig" in cluster.json()["detail"]

    async def test_refused_credentials_fail_at_once_without_retries(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig(token="wrong-token"))
        cluster = (await create_cluster(api, credential, connect_attempts=5)).json()
        body = await wait_for_cluster(api, cluster["id"], "failed")
        assert body["status_reason"].startswith("connect failed")
        assert "401" in body["status_reason"] or "refused" in body["status_reason"]
        run = await wait_for_status(api, cluster["workflow_id"], "failed")
        assert "connect failed" in run["error"]
        # One attempt, not five: a refused credential is not retried.
        assert version_calls(kube_api) == 1
        assert cluster["namespace"] not in kube_api.namespaces

    async def test_an_unreachable_server_is_retried_then_fails(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        kube_api.fail_with(503)
        cluster = (await create_cluster(api, credential, connect_attempts=3)).json()
        body = await wait_for_cluster(api, cluster["id"], "failed", within=60)
        assert body["status_reason"].startswith("connect failed")
        assert version_calls(kube_api) == 3
        # A failed onboarding frees the server for a new attempt.
        kube_api.fail_with(None)
        with_nodes(kube_api)
        again = await create_cluster(api, credential, name="prod-2")
        assert again.status_code == 202, again.text
        await wait_for_cluster(api, again.json()["id"], "available")

    async def test_cancelling_after_prepare_removes_the_namespace(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        with_nodes(kube_api)
        created, release = hold_after_namespace_created(kube_api)
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        cluster = (await create_cluster(api, credential)).json()
        try:
            assert await asyncio.to_thread(created.wait, 30)
            assert cluster["namespace"] in kube_api.namespaces
            response = await api.post(f"/api/v1/workflows/{cluster['workflow_id']}/cancel")
            assert response.status_code == 202, response.text
        finally:
            release.set()
        await wait_for_status(api, cluster["workflow_id"], "cancelled")
        listed = (await api.get("/api/v1/clusters", params={"include_deleted": True})).json()
        [row] = listed["items"]
        assert row["status"] == "deleted"
        assert f"removed namespace/{cluster['namespace']}" in row["status_reason"]
        assert cluster["namespace"] not in kube_api.namespaces

    async def test_delete_removes_the_namespace(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        with_nodes(kube_api)
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        cluster = (await create_cluster(api, credential)).json()
        await wait_for_cluster(api, cluster["id"], "available")
        assert cluster["namespace"] in kube_api.namespaces
        response = await api.delete(f"/api/v1/clusters/{cluster['id']}")
        assert response.status_code == 202
        run = await wait_for_status(api, f"cluster-delete-{cluster['id']}", "completed")
        assert cluster["namespace"] not in kube_api.namespaces
        assert "completed" in [s["status"] for s in run["progress"]["steps"]]
        listed = (await api.get("/api/v1/clusters", params={"include_deleted": True})).json()
        assert [row["status"] for row in listed["items"]] == ["deleted"]

    async def test_delete_of_an_unreachable_cluster_needs_force(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, kube_api: KubeApiServer
    ) -> None:
        with_nodes(kube_api)
        await start_workers(ALL_QUEUES)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        cluster = (await create_cluster(api, credential)).json()
        await wait_for_cluster(api, cluster["id"], "available")
        kube_api.fail_with(403)
        await api.delete(f"/api/v1/clusters/{cluster['id']}")
        body = await wait_for_cluster(api, cluster["id"], "failed")
        assert "force=true" in body["status_reason"]
        forced = await api.delete(f"/api/v1/clusters/{cluster['id']}", params={"force": True})
        assert forced.status_code == 202
        await wait_for_status(api, f"cluster-delete-{cluster['id']}", "completed")
        assert (await api.get(f"/api/v1/clusters/{cluster['id']}")).status_code == 404


def worker_process_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "CP_ENVIRONMENT": "test",
        "CP_DATA_DIR": str(settings.data_dir),
        "CP_DATABASE__URL": settings.database.url.get_secret_value(),
        "CP_REDIS__URL": settings.redis.url.get_secret_value(),
        "CP_TEMPORAL__ADDRESS": settings.temporal.address,
        "CP_TEMPORAL__TASK_QUEUE_PREFIX": settings.temporal.task_queue_prefix,
        "CP_AUTH__JWT_SECRET": settings.auth.jwt_secret.get_secret_value(),
        "CP_LOG_LEVEL": "warning",
    }


async def spawn_worker(settings: Settings) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane.cli",
        "worker",
        "--all",
        env=worker_process_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


class TestWorkerCrash:
    @pytest.mark.timeout(150)
    async def test_onboarding_survives_a_killed_worker(
        self, api: httpx.AsyncClient, kube_api: KubeApiServer, settings: Settings
    ) -> None:
        """The worker process is SIGKILLed while the namespace request is in flight (the
        stand-in has created it and holds the answer). A new worker picks the work up:
        the workflow completes with one cluster row and one namespace."""
        with_nodes(kube_api)
        created, release = hold_after_namespace_created(kube_api)
        credential = await store_kubeconfig(api, kube_api.kubeconfig())
        first = await spawn_worker(settings)
        second = None
        try:
            cluster = (await create_cluster(api, credential)).json()
            assert await asyncio.to_thread(created.wait, 60), "prepare never reached the cluster"
            first.send_signal(signal.SIGKILL)
            await first.wait()
            release.set()
            second = await spawn_worker(settings)
            body = await wait_for_cluster(api, cluster["id"], "available", within=90)
        finally:
            release.set()
            for process in (first, second):
                if process is not None and process.returncode is None:
                    process.terminate()
                    await process.wait()
        assert [(e["previous_status"], e["status"]) for e in reversed(body["history"])] == [
            (None, "onboarding"),
            ("onboarding", "available"),
        ]
        ours = [ns for ns in kube_api.namespaces if ns.startswith("cp-")]
        assert ours == [cluster["namespace"]]
        assert kube_api.count("POST", "/api/v1/namespaces") == 2
        engine = create_engine(settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                count = (
                    await session.exec(
                        select(func.count()).where(col(Cluster.server_url) == kube_api.url)
                    )
                ).one()
        finally:
            await engine.dispose()
        assert count == 1
