"""Operators find and steer our workflows with the real `temporal` CLI: search
attributes make them findable, and a cancel from the CLI is reflected by the API."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from control_plane.core.config import Settings
from control_plane.devstack.services import venv_binary
from tests.fixtures.stack import StartWorkers
from tests.integration.test_workflow_runs import wait_for_status
from workflows.queues import ALL_QUEUES, Queue


async def temporal_cli(settings: Settings, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        venv_binary("temporal"),
        *args,
        "--address",
        settings.temporal.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


class TestTemporalCli:
    async def test_list_by_search_attribute_finds_the_run(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, settings: Settings
    ) -> None:
        await start_workers(ALL_QUEUES)
        workflow_id = (await api.post("/api/v1/system/diagnostics", json={})).json()["workflow_id"]
        await wait_for_status(api, workflow_id, "completed")
        query = f"CpResourceKind = 'system' AND WorkflowId = '{workflow_id}'"
        # Visibility is eventually consistent; give it a moment.
        for _ in range(50):
            out = await temporal_cli(settings, "workflow", "list", "--query", query, "-o", "json")
            rows: list[dict[str, Any]] = json.loads(out) if out.strip() else []
            if rows:
                break
            await asyncio.sleep(0.1)
        assert [row["execution"]["workflowId"] for row in rows] == [workflow_id]
        assert rows[0]["type"]["name"] == "DiagnoseSystem"

    async def test_cancel_from_the_cli_is_seen_by_the_api(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, settings: Settings
    ) -> None:
        await start_workers([Queue.ORCHESTRATION])
        workflow_id = (
            await api.post(
                "/api/v1/system/diagnostics", json={"queues": ["cp-model"], "timeout_seconds": 600}
            )
        ).json()["workflow_id"]
        await wait_for_status(api, workflow_id, "running")
        await temporal_cli(settings, "workflow", "cancel", "--workflow-id", workflow_id)
        body = await wait_for_status(api, workflow_id, "cancelled")
        assert body["progress"]["steps"][0]["status"] == "cancelled"
