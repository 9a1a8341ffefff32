"""Model workflows with the real activities (real PostgreSQL and object store): the
catalog sync on the time-skipping test server against a stand-in OpenAI-compatible
`/v1/models` server (the providers' APIs are unreachable here), the Temporal Schedules
on the dev server (the time-skipping test server has no schedules), and replay of
`OnboardModel` histories (fresh and recorded) to guard determinism."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from sqlmodel import select
from temporalio.client import (
    Client,
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
    WorkflowHistory,
)
from temporalio.worker import Replayer

from control_plane.core.db import session_scope
from control_plane.core.temporal import data_converter
from control_plane.credentials.crypto import load_vault
from control_plane.credentials.schemas import CredentialCreate
from control_plane.credentials.service import CredentialService
from control_plane.models.catalog import load_bundled_catalog
from control_plane.models.schedules import ensure_model_schedules
from control_plane.models.tables import CatalogModel, Model
from tests.fixtures.hf import HubServer
from tests.integration.test_models_onboarding import APACHE_CARD, tiny_llama
from tests.workflows.test_cluster_workflows import ORCHESTRATION_WORKFLOWS, Stack, stack
from workers.main import _workflow_runner
from workflows.contracts.models import (
    CatalogSyncRequest,
    CatalogSyncResult,
    ModelRef,
    OnboardModelRequest,
    SourceKind,
)
from workflows.queues import QUEUE_PREFIX_MEMO, Queue, task_queue

__all__ = ["stack"]

HISTORIES = Path(__file__).parent / "histories"


class OpenAIModels:
    """`GET /v1/models` with a bearer key, answering whatever `models` holds."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.key = "sk-stand-in"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {owner.key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps(
                    {"object": "list", "data": [{"id": m, "object": "model"} for m in owner.models]}
                ).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def openai_models() -> Iterator[OpenAIModels]:
    server = OpenAIModels()
    yield server
    server.server.shutdown()
    server.server.server_close()


async def catalog(stack: Stack) -> dict[tuple[str, str], CatalogModel]:
    async with session_scope(stack.sessions) as session:
        rows = (
            await session.exec(
                select(CatalogModel).where(CatalogModel.tenant_id == stack.tenant_id)
            )
        ).all()
    return {(r.provider, r.model_id): r for r in rows}


async def sync(stack: Stack) -> CatalogSyncResult:
    result = await stack.env.client.execute_workflow(
        "SyncCloudModels",
        CatalogSyncRequest(tenant_ids=[stack.tenant_id]),
        id=f"cloud-model-sync-{uuid.uuid4()}",
        task_queue=task_queue(Queue.ORCHESTRATION, stack.prefix),
        memo={QUEUE_PREFIX_MEMO: stack.prefix},
        result_type=CatalogSyncResult,
    )
    assert isinstance(result, CatalogSyncResult)
    return result


def expected_statuses() -> dict[tuple[str, str], str]:
    """The bundled catalog as stored: retirements the provider announced show as
    deprecated."""
    return {
        entry.key: "deprecated" if entry.deprecated else "available"
        for entry in load_bundled_catalog()
    }


class TestCatalogSync:
    async def test_without_credentials_the_bundled_catalog_is_loaded(self, stack: Stack) -> None:
        result = await sync(stack)
        bundled = load_bundled_catalog()
        assert result.added == len(bundled)
        assert result.providers_checked == []
        rows = await catalog(stack)
        assert {key: row.status for key, row in rows.items()} == expected_statuses()
        again = await sync(stack)
        assert (again.added, again.updated, again.deprecated) == (0, 0, 0)

    async def test_live_lists_add_and_deprecate_never_delete(
        self, stack: Stack, openai_models: OpenAIModels
    ) -> None:
        async with session_scope(stack.sessions) as session:
            await CredentialService(session, load_vault(stack.settings)).create(
                stack.principal,
                TypeAdapter(CredentialCreate).validate_python(
                    {
                        "name": "openai",
                        "provider": "openai",
                        "api_key": openai_models.key,
                        "base_url": openai_models.url,
                    }
                ),
                project_id=None,
            )
        openai_models.models = ["gpt-4o", "ft:gpt-4o:acme:custom"]
        first = await sync(stack)
        assert first.providers_checked == ["openai"]
        rows = await catalog(stack)
        assert rows[("openai", "gpt-4o")].origin == "both"
        assert rows[("openai", "ft:gpt-4o:acme:custom")].origin == "live"
        assert rows[("openai", "ft:gpt-4o:acme:custom")].input_price_per_mtok is None
        # Bundled models of providers without a credential stay available.
        assert any(p == "anthropic" for p, _ in rows)

        openai_models.models = ["ft:gpt-4o:acme:custom"]
        second = await sync(stack)
        assert second.deprecated == 1
        rows = await catalog(stack)
        assert rows[("openai", "gpt-4o")].status == "deprecated"
        assert rows[("openai", "ft:gpt-4o:acme:custom")].status == "available"

    async def test_a_failing_provider_is_reported_and_changes_nothing(
        self, stack: Stack, openai_models: OpenAIModels
    ) -> None:
        async with session_scope(stack.sessions) as session:
            await CredentialService(session, load_vault(stack.settings)).create(
                stack.principal,
                TypeAdapter(CredentialCreate).validate_python(
                    {
                        "name": "openai",
                        "provider": "openai",
                        "api_key": "sk-wrong",
                        "base_url": openai_models.url,
                    }
                ),
                project_id=None,
            )
        result = await sync(stack)
        assert result.providers_checked == []
        assert result.errors
        assert result.errors[0].startswith("openai:")
        rows = await catalog(stack)
        assert {key: row.status for key, row in rows.items()} == expected_statuses()


class TestSchedules:
    async def test_created_then_updated_in_place(
        self, temporal_client: Client, queue_prefix: str
    ) -> None:
        ids = await ensure_model_schedules(temporal_client, queue_prefix)
        assert ids == [f"{queue_prefix}cloud-model-sync", f"{queue_prefix}model-rescan"]
        again = await ensure_model_schedules(
            temporal_client, queue_prefix, sync_every=timedelta(hours=6)
        )
        assert again == ids
        try:
            described = await temporal_client.get_schedule_handle(ids[0]).describe()
            action = described.schedule.action
            assert isinstance(action, ScheduleActionStartWorkflow)
            assert action.workflow == "SyncCloudModels"
            assert action.task_queue == task_queue(Queue.ORCHESTRATION, queue_prefix)
            assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
            assert described.schedule.spec.intervals[0].every == timedelta(hours=6)
            rescan = await temporal_client.get_schedule_handle(ids[1]).describe()
            assert isinstance(rescan.schedule.action, ScheduleActionStartWorkflow)
            assert rescan.schedule.action.workflow == "RescanModels"
        finally:
            for schedule_id in ids:
                await temporal_client.get_schedule_handle(schedule_id).delete()


class TestReplay:
    async def test_fresh_onboarding_history_replays(
        self, stack: Stack, hf_server: HubServer, tmp_path: Path
    ) -> None:
        stack.settings.models.hf_endpoint = hf_server.url
        stack.settings.models.staging_dir = tmp_path / "staging"
        hf_server.add_repo("acme/tiny-llama", tiny_llama(), card=APACHE_CARD)
        async with session_scope(stack.sessions) as session:
            row = Model(
                tenant_id=stack.tenant_id,
                name="tiny",
                source_kind="huggingface",
                source_ref="acme/tiny-llama",
                revision="main",
            )
            session.add(row)
        workflow_id = f"model-onboard-{row.id}"
        result = await stack.env.client.execute_workflow(
            "OnboardModel",
            OnboardModelRequest(
                model=ModelRef(model_id=row.id, tenant_id=stack.tenant_id),
                source_kind=SourceKind.HUGGINGFACE,
            ),
            id=workflow_id,
            task_queue=task_queue(Queue.ORCHESTRATION, stack.prefix),
            memo={QUEUE_PREFIX_MEMO: stack.prefix},
        )
        assert result["status"] == "ready"
        history = await stack.env.client.get_workflow_handle(workflow_id).fetch_history()
        (tmp_path / "onboard_model_hf.json").write_text(history.to_json())
        await Replayer(
            workflows=ORCHESTRATION_WORKFLOWS,
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)

    @pytest.mark.parametrize("path", sorted(HISTORIES.glob("*model*.json")), ids=lambda p: p.name)
    async def test_recorded_histories_replay(self, path: Path) -> None:
        text = await asyncio.to_thread(path.read_text)
        history = WorkflowHistory.from_json(path.stem, json.loads(text))
        await Replayer(
            workflows=ORCHESTRATION_WORKFLOWS,
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)
