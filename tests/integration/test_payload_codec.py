"""Temporal payload encryption on a real dev server: `DiagnoseSystem` runs on workers
whose client has the codec, its history holds no clear-text payload, and the API's
remote codec endpoint (for the Temporal Web UI) decodes it for tenant admins only."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from control_plane.core import temporal
from control_plane.core.codec import generate_key, payload_codec
from control_plane.core.config import CodecSettings, Settings
from control_plane.core.db import create_engine, create_sessionmaker
from control_plane.core.storage import FileObjectStore
from control_plane.credentials.crypto import load_vault
from tests.fixtures.identity import Actor, IdentityFactory
from tests.fixtures.stack import ApiServer
from workers.main import build_workers
from workers.registry import WorkerResources
from workflows.contracts.common import ResourceRef
from workflows.contracts.system import DiagnoseRequest, DiagnoseResult
from workflows.queues import ALL_QUEUES, QUEUE_PREFIX_MEMO, Queue

CODEC_KEY = generate_key()
CODEC_PATH = "/api/v1/temporal-codec"
UI_ORIGIN = "http://localhost:8233"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """API, workers and client of this module encrypt payloads with the key `c1`."""
    return settings.model_copy(
        update={"codec": CodecSettings(keys={"c1": SecretStr(CODEC_KEY)}, active_key="c1")}
    )


@pytest_asyncio.fixture(loop_scope="session")
async def codec_client(settings: Settings) -> Client:
    return await temporal.connect(settings.temporal, codec=payload_codec(settings.codec))


@pytest_asyncio.fixture(loop_scope="session")
async def diagnosed(settings: Settings, codec_client: Client) -> AsyncIterator[str]:
    """A finished `DiagnoseSystem` run on every pool, through codec-enabled workers."""
    engine = create_engine(settings.database)
    workers = build_workers(
        codec_client,
        WorkerResources(
            sessions=create_sessionmaker(engine),
            vault=load_vault(settings),
            data_dir=settings.data_dir,
            objects=FileObjectStore(settings.objects_dir),
            models=settings.models,
        ),
        ALL_QUEUES,
        prefix=settings.temporal.task_queue_prefix,
        settings=settings.worker,
    )
    runs = [asyncio.create_task(w.run()) for w in workers]
    try:
        handle = await temporal.start_workflow(
            codec_client,
            "DiagnoseSystem",
            DiagnoseRequest(timeout_seconds=20),
            workflow_id=f"system-diagnose-{uuid.uuid4()}",
            resource=ResourceRef(kind="system"),
            queue_prefix=settings.temporal.task_queue_prefix,
            result_type=DiagnoseResult,
        )
        result = await asyncio.wait_for(handle.result(), 60)
        assert isinstance(result, DiagnoseResult)
        assert result.healthy
        yield handle.id
    finally:
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        await asyncio.gather(*runs, return_exceptions=True)
        await engine.dispose()


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every payload in a history event, except search attributes (Temporal indexes
    those, so they are never encrypted)."""
    for field, value in message.ListFields():
        if field.message_type is None or field.name == "search_attributes":
            continue
        if field.message_type.GetOptions().map_entry:
            items = list(value.values())
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, Payload):
                yield item
            else:
                yield from payloads_in(item)


async def history_payloads(client: Client, workflow_id: str) -> list[Payload]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    events: list[HistoryEvent] = list(history.events)
    return [p for event in events for p in payloads_in(event)]


def as_json(payload: Payload) -> dict[str, object]:
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


@pytest_asyncio.fixture(loop_scope="session")
async def client(api_server: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as http:
        yield http


class TestEncryptedHistory:
    async def test_history_read_without_the_codec_holds_no_clear_text(
        self, diagnosed: str, temporal_client: Client, settings: Settings
    ) -> None:
        payloads = await history_payloads(temporal_client, diagnosed)
        # Input, memo, every activity's input and result, the workflow's result.
        assert len(payloads) >= 2 * len(ALL_QUEUES) + 3
        clear_text = [
            settings.temporal.task_queue_prefix.encode(),
            b"system",
            b"cp-orchestration",
            b"worker_host",
            b"timeout_seconds",
        ]
        for payload in payloads:
            assert payload.metadata["encoding"] == b"binary/encrypted"
            assert payload.metadata["encryption-key-id"] == b"c1"
            for text in clear_text:
                assert text not in payload.data

    async def test_the_codec_client_reads_the_same_history_in_clear(
        self, diagnosed: str, codec_client: Client, settings: Settings
    ) -> None:
        described = await codec_client.get_workflow_handle(diagnosed).describe()
        # The memo is encrypted too; the codec client decodes it.
        assert await described.memo_value(QUEUE_PREFIX_MEMO) == settings.temporal.task_queue_prefix
        handle = codec_client.get_workflow_handle(diagnosed, result_type=DiagnoseResult)
        result = await handle.result()
        assert {p.queue for p in result.answered} == set(Queue)


class TestCodecEndpoint:
    async def test_tenant_admin_decodes_a_history_payload(
        self,
        diagnosed: str,
        temporal_client: Client,
        client: httpx.AsyncClient,
        identities: IdentityFactory,
    ) -> None:
        admin = await identities.user(await identities.tenant(), admin=True)
        encrypted = (await history_payloads(temporal_client, diagnosed))[0]
        plain_text = {
            "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
            "data": base64.b64encode(b'"hello"').decode(),
        }
        response = await client.post(
            f"{CODEC_PATH}/decode",
            json={"payloads": [as_json(encrypted), plain_text]},
            headers={**admin.headers, "X-Namespace": "default"},
        )
        assert response.status_code == 200, response.text
        decoded, passed = response.json()["payloads"]
        assert base64.b64decode(decoded["metadata"]["encoding"]) == b"json/plain"
        assert b"timeout_seconds" in base64.b64decode(decoded["data"])
        assert passed == plain_text

        again = await client.post(
            f"{CODEC_PATH}/encode", json={"payloads": [decoded]}, headers=admin.headers
        )
        assert again.status_code == 200
        reencoded = again.json()["payloads"][0]
        assert base64.b64decode(reencoded["metadata"]["encryption-key-id"]) == b"c1"
        assert reencoded["data"] != as_json(encrypted)["data"]

    async def test_unknown_key_is_a_problem_400(
        self, client: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        admin = await identities.user(await identities.tenant(), admin=True)
        foreign = payload_codec(CodecSettings(keys={"zz": SecretStr(generate_key())}))
        assert foreign is not None
        [sealed] = await foreign.encode([Payload(metadata={"encoding": b"json/plain"}, data=b"1")])
        response = await client.post(
            f"{CODEC_PATH}/decode", json={"payloads": [as_json(sealed)]}, headers=admin.headers
        )
        assert response.status_code == 400
        assert "'zz'" in response.json()["detail"]

    async def test_anonymous_is_401_and_non_admin_is_403(
        self, client: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        body: dict[str, list[object]] = {"payloads": []}
        user: Actor = await identities.user(await identities.tenant())
        for operation in ("decode", "encode"):
            anonymous = await client.post(f"{CODEC_PATH}/{operation}", json=body)
            assert anonymous.status_code == 401
            forbidden = await client.post(
                f"{CODEC_PATH}/{operation}", json=body, headers=user.headers
            )
            assert forbidden.status_code == 403

    async def test_temporal_ui_preflight_needs_no_token(self, client: httpx.AsyncClient) -> None:
        response = await client.options(
            f"{CODEC_PATH}/decode",
            headers={
                "Origin": UI_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
            },
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == UI_ORIGIN
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        assert response.headers["access-control-allow-credentials"] == "true"

    async def test_cors_covers_the_codec_paths_for_ui_origins_only(
        self, client: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        stranger = await client.options(
            f"{CODEC_PATH}/decode",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in stranger.headers
        admin = await identities.user(await identities.tenant(), admin=True)
        elsewhere = await client.get(
            "/api/v1/credentials", headers={**admin.headers, "Origin": UI_ORIGIN}
        )
        assert elsewhere.status_code == 200
        assert "access-control-allow-origin" not in elsewhere.headers
        codec = await client.post(
            f"{CODEC_PATH}/decode",
            json={"payloads": []},
            headers={**admin.headers, "Origin": UI_ORIGIN},
        )
        assert codec.headers["access-control-allow-origin"] == UI_ORIGIN
