"""Workflow runs end to end: the API starts `DiagnoseSystem` on a real Temporal dev
server, real workers run it, bookkeeping lands in real PostgreSQL, and the API serves
the list, live progress, server-sent events and cancellation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from temporalio.client import Client

from tests.fixtures.stack import StartWorkers
from workflows.contracts.common import SA_PROJECT_ID, SA_RESOURCE_KIND
from workflows.queues import ALL_QUEUES, Queue


async def wait_for_status(
    api: httpx.AsyncClient, workflow_id: str, status: str, within: float = 30
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        body: dict[str, Any] = (await api.get(f"/api/v1/workflows/{workflow_id}")).json()
        if body.get("status") == status:
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.1)


async def read_events(api: httpx.AsyncClient, workflow_id: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    event = None
    async with api.stream("GET", f"/api/v1/workflows/{workflow_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event or "message", json.loads(line.split(":", 1)[1])))
    return events


class TestDiagnosisRun:
    async def test_completed_run_is_listed_with_every_pool_answering(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        await start_workers(ALL_QUEUES)
        started = await api.post("/api/v1/system/diagnostics", json={"timeout_seconds": 20})
        assert started.status_code == 202
        workflow_id = started.json()["workflow_id"]

        body = await wait_for_status(api, workflow_id, "completed")
        assert body["kind"] == "DiagnoseSystem"
        assert body["resource_kind"] == "system"
        assert body["finished_at"] is not None
        steps = body["progress"]["steps"]
        assert [s["name"] for s in steps] == [f"ping {q.value}" for q in ALL_QUEUES]
        assert all(s["status"] == "completed" for s in steps)
        assert body["progress"]["percent"] == 100.0

        listed = (await api.get("/api/v1/workflows", params={"kind": "DiagnoseSystem"})).json()
        assert listed["total"] == 1
        assert listed["items"][0]["workflow_id"] == workflow_id
        assert listed["items"][0]["status"] == "completed"

    async def test_run_carries_search_attributes(
        self, api: httpx.AsyncClient, start_workers: StartWorkers, temporal_client: Client
    ) -> None:
        await start_workers(ALL_QUEUES)
        workflow_id = (await api.post("/api/v1/system/diagnostics", json={})).json()["workflow_id"]
        description = await temporal_client.get_workflow_handle(workflow_id).describe()
        assert description.typed_search_attributes.get(SA_RESOURCE_KIND) == "system"
        assert description.typed_search_attributes.get(SA_PROJECT_ID) is None

    async def test_events_stream_progress_until_the_end(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        await start_workers(ALL_QUEUES)
        workflow_id = (await api.post("/api/v1/system/diagnostics", json={})).json()["workflow_id"]
        events = await read_events(api, workflow_id)
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "end"
        assert events[-1][1]["status"] == "completed"
        assert "progress" in kinds
        last_progress = [data for kind, data in events if kind == "progress"][-1]
        assert all(s["status"] == "completed" for s in last_progress["steps"])


class TestLiveProgressAndCancellation:
    async def test_waiting_pool_shows_live_progress_and_cancel_records_cancelled(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        # No worker polls cp-model, so its ping waits: the run stays live until cancelled.
        await start_workers([q for q in ALL_QUEUES if q is not Queue.MODEL])
        workflow_id = (
            await api.post("/api/v1/system/diagnostics", json={"timeout_seconds": 600})
        ).json()["workflow_id"]

        async def model_step_waiting() -> dict[str, Any]:
            while True:
                body: dict[str, Any] = (await api.get(f"/api/v1/workflows/{workflow_id}")).json()
                steps = {s["name"]: s["status"] for s in body["progress"]["steps"]}
                others_done = all(v == "completed" for k, v in steps.items() if "cp-model" not in k)
                if steps and others_done:
                    return body
                await asyncio.sleep(0.1)

        body = await asyncio.wait_for(model_step_waiting(), 30)
        assert body["progress_source"] == "live"
        assert body["status"] == "running"
        steps = {s["name"]: s["status"] for s in body["progress"]["steps"]}
        assert steps["ping cp-model"] == "running"

        cancelled = await api.post(f"/api/v1/workflows/{workflow_id}/cancel")
        assert cancelled.status_code == 202

        body = await wait_for_status(api, workflow_id, "cancelled")
        steps = {s["name"]: s["status"] for s in body["progress"]["steps"]}
        assert steps["ping cp-model"] == "cancelled"
        assert steps["ping cp-cluster"] == "completed"

        again = await api.post(f"/api/v1/workflows/{workflow_id}/cancel")
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"

    async def test_cancelled_run_ends_its_event_stream(
        self, api: httpx.AsyncClient, start_workers: StartWorkers
    ) -> None:
        await start_workers([Queue.ORCHESTRATION])
        workflow_id = (
            await api.post(
                "/api/v1/system/diagnostics", json={"queues": ["cp-sync"], "timeout_seconds": 600}
            )
        ).json()["workflow_id"]
        reader = asyncio.create_task(read_events(api, workflow_id))
        await asyncio.sleep(1)
        assert (await api.post(f"/api/v1/workflows/{workflow_id}/cancel")).status_code == 202
        events = await asyncio.wait_for(reader, 30)
        assert events[-1] == ("end", {"status": "cancelled", "error": "cancelled"})


class TestUnknownRuns:
    async def test_unknown_workflow_is_a_problem_404(self, api: httpx.AsyncClient) -> None:
        for method, path in (
            ("GET", "/api/v1/workflows/nope"),
            ("POST", "/api/v1/workflows/nope/cancel"),
            ("GET", "/api/v1/workflows/nope/events"),
        ):
            response = await api.request(method, path)
            assert response.status_code == 404, path
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"] == "urn:control-plane:problem:not-found"

    async def test_list_rejects_bad_filters_with_422(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/api/v1/workflows", params={"status": "sleeping", "limit": 0})
        assert response.status_code == 422
        problem = response.json()
        assert problem["status"] == 422
        assert {tuple(e["loc"]) for e in problem["errors"]} == {
            ("query", "status"),
            ("query", "limit"),
        }
