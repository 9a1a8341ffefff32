"""`/healthz` and `/readyz` against real dependencies: PostgreSQL is stopped and started
again under a running API; Redis and Temporal are pointed at addresses where nothing
listens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from pydantic import SecretStr

from control_plane.core.config import Settings
from control_plane.devstack.services import EmbeddedPostgres, free_port, start_service
from tests.fixtures.stack import ApiServer


async def wait_for_status(
    client: httpx.AsyncClient, status: int, within: float = 20
) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        response = await client.get("/readyz")
        if response.status_code == status:
            return response
        assert asyncio.get_running_loop().time() < deadline, response.text
        await asyncio.sleep(0.2)


class TestReadiness:
    async def test_all_dependencies_up_is_ready(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready",
            "checks": {"postgres": "ok", "redis": "ok", "temporal": "ok", "object_store": "ok"},
        }

    async def test_healthz_needs_no_dependency(self, tmp_path: Path, settings: Settings) -> None:
        broken = settings.model_copy(
            update={
                "redis": settings.redis.model_copy(update={"url": SecretStr("unix:///nope.sock")})
            }
        )
        server = ApiServer(broken)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.get("/healthz")).json() == {"status": "ok"}
        finally:
            server.stop()

    async def test_postgres_stopped_then_restarted(
        self, tmp_path: Path, settings: Settings
    ) -> None:
        postgres = EmbeddedPostgres(tmp_path / "own-pg", socket_tag=f"rz{free_port()}")
        running = await start_service(postgres.spec())
        own = settings.model_copy(
            update={
                "database": settings.database.model_copy(update={"url": SecretStr(postgres.url())})
            }
        )
        server = ApiServer(own)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                await wait_for_status(client, 200)

                await asyncio.to_thread(running.stop)
                down = await wait_for_status(client, 503)
                assert down.headers["content-type"] == "application/problem+json"
                problem = down.json()
                assert problem["failing"] == ["postgres"]
                assert problem["detail"] == "unreachable: postgres"
                assert problem["checks"]["redis"] == "ok"

                running = await start_service(postgres.spec())
                up = await wait_for_status(client, 200)
                assert up.json()["status"] == "ready"
        finally:
            server.stop()
            running.stop()

    async def test_unreachable_redis_and_temporal_are_named(self, settings: Settings) -> None:
        broken = settings.model_copy(
            update={
                "redis": settings.redis.model_copy(
                    update={"url": SecretStr("redis://127.0.0.1:1/0")}
                ),
                "temporal": settings.temporal.model_copy(
                    update={"address": f"127.0.0.1:{free_port()}"}
                ),
            }
        )
        server = ApiServer(broken)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                response = await client.get("/readyz")
        finally:
            server.stop()
        assert response.status_code == 503
        assert response.json()["failing"] == ["redis", "temporal"]


class TestMetrics:
    async def test_requests_are_counted_by_route_template(self, api: httpx.AsyncClient) -> None:
        await api.get("/api/v1/workflows/some-id")
        text = (await api.get("/metrics")).text
        assert 'handler="/api/v1/workflows/{workflow_id}"' in text
        assert "http_request_duration_seconds_bucket" in text
        assert 'status="404"' in text
