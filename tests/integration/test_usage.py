"""Usage records end to end: the recorder writes batches into real PostgreSQL, and real
callers read the aggregates through the real API.

Every usage row here is written by `UsageRecorder`, the gateway's own path; the entries
carry explicit finish times so that windows and time buckets are known in advance.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker
from control_plane.devstack.services import free_port
from control_plane.identity.tables import Project, ProjectRole, Tenant
from control_plane.usage.recorder import UsageEntry, UsageRecorder
from tests.fixtures.identity import Actor, IdentityFactory

USAGE = "/api/v1/usage"


def entry(
    *,
    tenant_id: uuid.UUID | None = None,
    project_id: uuid.UUID | None = None,
    api_key_id: uuid.UUID | None = None,
    **fields: Any,
) -> UsageEntry:
    return UsageEntry(
        tenant_id=tenant_id or uuid.uuid4(),
        project_id=project_id or uuid.uuid4(),
        api_key_id=api_key_id or uuid.uuid4(),
        route=fields.pop("route", "chat"),
        status=fields.pop("status", 200),
        latency_ms=fields.pop("latency_ms", 12.5),
        **fields,
    )


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def fetch(settings: Settings, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database.url.get_secret_value().replace("+asyncpg", ""))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def count_rows(settings: Settings) -> int:
    rows = await fetch(settings, "SELECT count(*) AS n FROM usage_record")
    return int(rows[0]["n"])


def count_inserts(engine: AsyncEngine) -> list[int]:
    """Counts INSERT statements sent to `usage_record` (an executemany is one)."""
    sent = [0]

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO usage_record"):
            sent[0] += 1

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return sent


def dropped(registry: CollectorRegistry, reason: str = "buffer_full") -> float:
    return registry.get_sample_value("cp_gateway_usage_dropped_total", {"reason": reason}) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database)
    yield engine
    await engine.dispose()


class TestRecorder:
    async def test_entries_are_written_in_batches_of_one_insert_each(
        self, engine: AsyncEngine, settings: Settings
    ) -> None:
        inserts = count_inserts(engine)
        # A long period: only a full batch wakes the writer.
        recorder = UsageRecorder(create_sessionmaker(engine), batch_size=500, flush_seconds=60)
        await recorder.start()
        try:
            for i in range(1200):
                recorder.record(entry(prompt_tokens=i))
            await eventually(lambda: recorder.pending == 0 and recorder.flushes == 3)
        finally:
            await recorder.stop()
        assert inserts[0] == 3
        assert await count_rows(settings) == 1200
        [row] = await fetch(
            settings,
            "SELECT sum(prompt_tokens) AS tokens, count(DISTINCT id) AS ids FROM usage_record",
        )
        assert (row["tokens"], row["ids"]) == (sum(range(1200)), 1200)

    async def test_the_period_flushes_a_partial_batch(
        self, engine: AsyncEngine, settings: Settings
    ) -> None:
        recorder = UsageRecorder(create_sessionmaker(engine), batch_size=500, flush_seconds=0.05)
        await recorder.start()
        try:
            for _ in range(7):
                recorder.record(entry())
            await eventually(lambda: recorder.flushes == 1)
            assert await count_rows(settings) == 7
        finally:
            await recorder.stop()

    async def test_stop_writes_the_tail(self, engine: AsyncEngine, settings: Settings) -> None:
        recorder = UsageRecorder(create_sessionmaker(engine), batch_size=500, flush_seconds=60)
        await recorder.start()
        for _ in range(150):
            recorder.record(entry())
        await asyncio.sleep(0.2)
        assert (recorder.pending, recorder.flushes) == (150, 0)
        assert await count_rows(settings) == 0

        await recorder.stop()

        assert (recorder.pending, recorder.flushes) == (0, 1)
        assert await count_rows(settings) == 150

    async def test_a_row_keeps_what_the_gateway_measured(
        self, engine: AsyncEngine, settings: Settings
    ) -> None:
        finished = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
        sent = entry(
            route="chat",
            target="sim-a",
            endpoint_id=uuid.uuid4(),
            status=200,
            prompt_tokens=11,
            completion_tokens=22,
            latency_ms=123.4,
            ttft_ms=45.6,
            stream=True,
            finished_at=finished,
        )
        recorder = UsageRecorder(create_sessionmaker(engine))
        recorder.record(sent)
        await recorder.stop()
        [row] = await fetch(settings, "SELECT * FROM usage_record")
        assert dict(row) | {"id": None} == {
            "id": None,
            "created_at": finished,
            "updated_at": finished,
            "tenant_id": sent.tenant_id,
            "project_id": sent.project_id,
            "api_key_id": sent.api_key_id,
            "route": "chat",
            "target": "sim-a",
            "endpoint_id": sent.endpoint_id,
            "status": 200,
            "prompt_tokens": 11,
            "completion_tokens": 22,
            "latency_ms": 123.4,
            "ttft_ms": 45.6,
            "stream": True,
        }

    async def test_what_a_column_cannot_hold_is_cut_rather_than_failing_the_batch(
        self, engine: AsyncEngine, settings: Settings
    ) -> None:
        recorder = UsageRecorder(create_sessionmaker(engine))
        recorder.record(
            entry(
                route="a\x00b" + "x" * 400,
                prompt_tokens=2**40,
                completion_tokens=-3,
                latency_ms=float("nan"),
                ttft_ms=float("inf"),
            )
        )
        recorder.record(entry(route="fine"))
        await recorder.stop()
        rows = await fetch(
            settings,
            "SELECT route, prompt_tokens, completion_tokens, latency_ms, ttft_ms "
            "FROM usage_record ORDER BY route",
        )
        assert [tuple(r) for r in rows] == [
            ("ab" + "x" * 253, 2**31 - 1, 0, 0.0, None),
            ("fine", 0, 0, 12.5, None),
        ]
        assert recorder.dropped == 0

    async def test_an_entry_that_makes_no_row_is_dropped_alone(
        self, engine: AsyncEngine, settings: Settings
    ) -> None:
        registry = CollectorRegistry()
        recorder = UsageRecorder(create_sessionmaker(engine), registry=registry)
        recorder.record(entry(route="before"))
        recorder.record(entry(route=None))
        recorder.record(entry(route="after"))
        await recorder.stop()
        rows = await fetch(settings, "SELECT route FROM usage_record ORDER BY route")
        assert [r["route"] for r in rows] == ["after", "before"]
        assert (recorder.dropped, dropped(registry, "rejected")) == (1, 1)


class TestOutage:
    async def test_record_is_synchronous_and_cheap(self) -> None:
        # Nothing listens on this port; `record` must not care.
        down = create_engine(
            Settings(_env_file=None).database,
            url=f"postgresql+asyncpg://cp:cp@127.0.0.1:{free_port()}/cp",
        )
        recorder = UsageRecorder(create_sessionmaker(down), max_buffer=100_000)
        assert not inspect.iscoroutinefunction(recorder.record)
        entries = [entry() for _ in range(50_000)]
        began = time.perf_counter()
        for item in entries:
            recorder.record(item)
        assert time.perf_counter() - began < 1.0
        assert recorder.pending == 50_000
        await down.dispose()

    async def test_entries_wait_out_an_outage_and_the_oldest_are_dropped(
        self, engine: AsyncEngine, settings: Settings
    ) -> None:
        down = create_engine(
            settings.database, url=f"postgresql+asyncpg://cp:cp@127.0.0.1:{free_port()}/cp"
        )
        sessions = create_sessionmaker(down)
        registry = CollectorRegistry()
        recorder = UsageRecorder(
            sessions, batch_size=100, flush_seconds=0.05, max_buffer=1000, registry=registry
        )
        await recorder.start()
        try:
            for i in range(1500):
                recorder.record(entry(prompt_tokens=i))
            # Failed batches go back into the buffer; only the overflow is lost.
            await eventually(lambda: recorder.failures >= 2 and recorder.pending == 1000)
            assert recorder.flushes == 0
            assert recorder.dropped == 500
            assert dropped(registry) == 500

            for i in range(1500, 1550):
                recorder.record(entry(prompt_tokens=i))
            await eventually(lambda: recorder.pending == 1000)
            assert (recorder.dropped, dropped(registry)) == (550, 550)

            # The database is back: the next try writes the newest 1000 entries.
            sessions.configure(bind=engine)
            await eventually(lambda: recorder.pending == 0, seconds=20)
        finally:
            await recorder.stop()
            await down.dispose()
        [row] = await fetch(
            settings,
            "SELECT count(*) AS n, min(prompt_tokens) AS first, max(prompt_tokens) AS last "
            "FROM usage_record",
        )
        assert (row["n"], row["first"], row["last"]) == (1000, 550, 1549)
        assert recorder.flushes == 10

    async def test_stop_gives_up_on_an_unreachable_database(self) -> None:
        down = create_engine(
            Settings(_env_file=None).database,
            url=f"postgresql+asyncpg://cp:cp@127.0.0.1:{free_port()}/cp",
        )
        recorder = UsageRecorder(create_sessionmaker(down), stop_seconds=2)
        await recorder.start()
        recorder.record(entry())
        began = time.monotonic()
        await recorder.stop()
        assert time.monotonic() - began < 5
        assert recorder.pending == 1
        assert recorder.failures >= 1
        await down.dispose()


# --- the report -------------------------------------------------------------------------


@dataclass
class World:
    tenant: Tenant
    project: Project
    other_project: Project
    admin: Actor
    viewer: Actor  # of `project` only
    outsider: Actor  # same tenant, no membership
    stranger: Actor  # admin of another tenant
    reader_key: dict[str, Any]  # of `project`, scope projects:read
    gateway_key: dict[str, Any]  # of `project`, scope gateway:write only
    anchor: datetime  # the recent requests finished here or an hour before
    old: datetime  # three days ago


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def record_all(settings: Settings, entries: Iterable[UsageEntry]) -> None:
    engine = create_engine(settings.database)
    recorder = UsageRecorder(create_sessionmaker(engine))
    await recorder.start()
    for item in entries:
        recorder.record(item)
    await recorder.stop()
    await engine.dispose()
    assert recorder.pending == 0


@pytest_asyncio.fixture(loop_scope="session")
async def world(
    anonymous_api: httpx.AsyncClient, identities: IdentityFactory, settings: Settings
) -> World:
    tenant = await identities.tenant()
    project = await identities.project(tenant)
    other_project = await identities.project(tenant)
    admin = await identities.user(tenant, admin=True)
    viewer = await identities.user(tenant)
    await identities.member(project, viewer, ProjectRole.VIEWER)
    outsider = await identities.user(tenant)
    stranger_tenant = await identities.tenant()
    stranger = await identities.user(stranger_tenant, admin=True)
    stranger_project = await identities.project(stranger_tenant)
    keys = []
    for name, scopes in (("reader", ["projects:read"]), ("gateway", ["gateway:write"])):
        created = await anonymous_api.post(
            f"/api/v1/projects/{project.id}/api-keys",
            json={"name": name, "scopes": scopes},
            headers=admin.headers,
        )
        assert created.status_code == 201, created.text
        keys.append(created.json())
    reader_key, gateway_key = keys

    now = datetime.now(UTC)
    anchor, old = now - timedelta(hours=2), now - timedelta(days=3)
    ours: dict[str, Any] = {"tenant_id": tenant.id, "project_id": project.id}
    chat = {**ours, "api_key_id": uuid.UUID(gateway_key["id"]), "route": "chat"}
    other = {
        **ours,
        "api_key_id": uuid.UUID(reader_key["id"]),
        "finished_at": anchor - timedelta(hours=1),
    }
    await record_all(
        settings,
        [
            entry(
                **chat,
                target="sim-a",
                latency_ms=100,
                prompt_tokens=10,
                completion_tokens=20,
                stream=True,
                ttft_ms=50,
                finished_at=anchor,
            ),
            entry(
                **chat,
                target="sim-a",
                latency_ms=200,
                prompt_tokens=10,
                completion_tokens=20,
                stream=True,
                ttft_ms=70,
                finished_at=anchor,
            ),
            entry(
                **chat,
                target="sim-a",
                latency_ms=300,
                prompt_tokens=10,
                completion_tokens=20,
                finished_at=anchor,
            ),
            entry(
                **chat,
                target="sim-a",
                latency_ms=400,
                prompt_tokens=10,
                completion_tokens=20,
                finished_at=anchor,
            ),
            entry(
                **chat,
                target="sim-b",
                status=500,
                latency_ms=1000,
                prompt_tokens=10,
                finished_at=anchor,
            ),
            entry(**other, route="embed", target="emb", latency_ms=20, prompt_tokens=5),
            entry(**other, route="nope", target="", status=404, latency_ms=1),
            # Outside the default window.
            entry(
                **chat,
                target="sim-a",
                latency_ms=50,
                prompt_tokens=100,
                completion_tokens=100,
                finished_at=old,
            ),
            # Another project of the tenant, and another tenant.
            entry(
                tenant_id=tenant.id,
                project_id=other_project.id,
                route="chat",
                target="sim-c",
                latency_ms=10,
                prompt_tokens=7,
                completion_tokens=7,
                finished_at=anchor,
            ),
            entry(
                tenant_id=stranger_tenant.id,
                project_id=stranger_project.id,
                route="chat",
                latency_ms=10,
                finished_at=anchor,
            ),
        ],
    )
    return World(
        tenant,
        project,
        other_project,
        admin,
        viewer,
        outsider,
        stranger,
        reader_key,
        gateway_key,
        anchor,
        old,
    )


async def report(
    client: httpx.AsyncClient, actor: Actor | dict[str, str], **params: Any
) -> dict[str, Any]:
    headers = actor.headers if isinstance(actor, Actor) else actor
    response = await client.get(USAGE, params=params, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_key(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {group["key"]: group for group in body["groups"]}


def hour(moment: datetime) -> str:
    return moment.replace(minute=0, second=0, microsecond=0).isoformat()


def day(moment: datetime) -> str:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()


class TestReport:
    async def test_per_model_totals_with_errors_tokens_and_latency(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        body = await report(anonymous_api, world.viewer, project_id=str(world.project.id))
        assert body["group_by"] == "model"
        assert body["truncated"] is False
        assert [g["key"] for g in body["groups"]][0] == "chat"
        groups = by_key(body)
        assert groups.keys() == {"chat", "embed", "nope"}
        chat = groups["chat"]
        assert {
            k: chat[k]
            for k in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
        } == {
            "requests": 5,
            "errors": 1,
            "prompt_tokens": 50,
            "completion_tokens": 80,
            "total_tokens": 130,
        }
        assert chat["latency_ms_p50"] == pytest.approx(300)
        assert chat["latency_ms_p95"] == pytest.approx(880)
        assert chat["ttft_ms_mean"] == pytest.approx(60)
        assert (groups["embed"]["requests"], groups["embed"]["ttft_ms_mean"]) == (1, None)
        assert (groups["nope"]["errors"], groups["nope"]["total_tokens"]) == (1, 0)

        total = body["total"]
        assert (total["requests"], total["errors"], total["total_tokens"]) == (7, 2, 135)
        # Over all seven latencies, not merged from the groups.
        assert total["latency_ms_p50"] == pytest.approx(200)
        assert total["latency_ms_p95"] == pytest.approx(820)

    async def test_grouped_by_api_key_and_by_target(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        project = str(world.project.id)
        keys = by_key(
            await report(anonymous_api, world.admin, project_id=project, group_by="api_key")
        )
        assert {k: g["requests"] for k, g in keys.items()} == {
            world.gateway_key["id"]: 5,
            world.reader_key["id"]: 2,
        }
        targets = by_key(
            await report(anonymous_api, world.admin, project_id=project, group_by="target")
        )
        # "": requests that reached no endpoint.
        assert {k: g["requests"] for k, g in targets.items()} == {
            "sim-a": 4,
            "sim-b": 1,
            "emb": 1,
            "": 1,
        }

    async def test_filters_by_key_and_route(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        project = str(world.project.id)
        mine = await report(
            anonymous_api, world.admin, project_id=project, api_key_id=world.reader_key["id"]
        )
        assert by_key(mine).keys() == {"embed", "nope"}
        assert mine["api_key_id"] == world.reader_key["id"]
        chat = await report(
            anonymous_api, world.admin, project_id=project, route="chat", group_by="target"
        )
        assert {k: g["requests"] for k, g in by_key(chat).items()} == {"sim-a": 4, "sim-b": 1}
        assert chat["total"]["requests"] == 5

    async def test_time_window_and_buckets(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        project = str(world.project.id)
        hours = await report(anonymous_api, world.admin, project_id=project, group_by="hour")
        assert [(g["key"], g["requests"]) for g in hours["groups"]] == [
            (hour(world.anchor - timedelta(hours=1)), 2),
            (hour(world.anchor), 5),
        ]
        start = (world.old - timedelta(minutes=1)).isoformat()
        days = await report(
            anonymous_api, world.admin, project_id=project, group_by="day", start=start
        )
        expected = Counter(
            [day(world.old)]
            + [day(world.anchor)] * 5
            + [day(world.anchor - timedelta(hours=1))] * 2
        )
        assert [(g["key"], g["requests"]) for g in days["groups"]] == sorted(expected.items())
        assert days["total"]["requests"] == 8
        assert days["start"] == start.replace("+00:00", "Z")

        # Only the old request: a window that ends before the recent ones.
        window = {"start": start, "end": (world.old + timedelta(minutes=1)).isoformat()}
        old = await report(anonymous_api, world.admin, project_id=project, **window)
        assert (old["total"]["requests"], old["total"]["prompt_tokens"]) == (1, 100)
        # A window without requests: zeros, no groups.
        empty = await report(
            anonymous_api,
            world.admin,
            project_id=project,
            start="2020-01-01T00:00:00Z",
            end="2020-01-02T00:00:00Z",
        )
        assert empty["groups"] == []
        assert empty["total"] == {
            "requests": 0,
            "errors": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "latency_ms_p50": None,
            "latency_ms_p95": None,
            "ttft_ms_mean": None,
        }

    async def test_limit_truncates_the_groups_not_the_total(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        body = await report(anonymous_api, world.admin, project_id=str(world.project.id), limit=1)
        assert [g["key"] for g in body["groups"]] == ["chat"]
        assert body["truncated"] is True
        assert body["total"]["requests"] == 7


class TestAccess:
    async def test_without_a_project_a_report_covers_what_the_caller_sees(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        tenant = await report(anonymous_api, world.admin, group_by="target")
        assert tenant["total"]["requests"] == 8
        assert by_key(tenant)["sim-c"]["requests"] == 1
        viewer = await report(anonymous_api, world.viewer)
        assert viewer["total"]["requests"] == 7
        outsider = await report(anonymous_api, world.outsider)
        assert outsider["total"]["requests"] == 0
        # Another tenant's admin sees only that tenant's request.
        stranger = await report(anonymous_api, world.stranger)
        assert stranger["total"]["requests"] == 1

    async def test_a_project_outside_the_callers_reach_is_not_found(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        for actor, project in (
            (world.stranger, world.project.id),
            (world.outsider, world.project.id),
            (world.viewer, world.other_project.id),
            (world.admin, uuid.uuid4()),
        ):
            response = await anonymous_api.get(
                USAGE, params={"project_id": str(project)}, headers=actor.headers
            )
            assert response.status_code == 404, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["detail"] == "project not found"

    async def test_an_api_key_reads_its_own_projects_usage_with_projects_read(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        key = bearer(world.reader_key["key"])
        assert (await report(anonymous_api, key, project_id=str(world.project.id)))["total"][
            "requests"
        ] == 7
        assert (await report(anonymous_api, key))["total"]["requests"] == 7
        other = await anonymous_api.get(
            USAGE, params={"project_id": str(world.other_project.id)}, headers=key
        )
        assert other.status_code == 404
        lacking = await anonymous_api.get(
            USAGE,
            params={"project_id": str(world.project.id)},
            headers=bearer(world.gateway_key["key"]),
        )
        assert lacking.status_code == 403

    async def test_anonymous_callers_are_refused(self, anonymous_api: httpx.AsyncClient) -> None:
        assert (await anonymous_api.get(USAGE)).status_code == 401


class TestValidation:
    @pytest.mark.parametrize(
        ("params", "message"),
        [
            (
                {"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
                "end must be after start",
            ),
            (
                {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
                "end must be after start",
            ),
            ({"start": "2024-01-01T00:00:00Z", "end": "2025-01-02T00:00:00Z"}, "at most 366 days"),
            ({"end": "0001-01-01T00:00:00Z"}, "between the years 1 and 9999"),
            ({"group_by": "week"}, "group_by"),
            ({"limit": 0}, "limit"),
            ({"start": "yesterday"}, "start"),
            # pydantic alone would read a number as Unix time.
            ({"end": "0.5"}, "ISO 8601"),
        ],
    )
    async def test_bad_queries_are_422(
        self, anonymous_api: httpx.AsyncClient, world: World, params: dict[str, Any], message: str
    ) -> None:
        response = await anonymous_api.get(USAGE, params=params, headers=world.admin.headers)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert message in response.json()["detail"]

    async def test_a_time_without_offset_is_utc(
        self, anonymous_api: httpx.AsyncClient, world: World
    ) -> None:
        body = await report(
            anonymous_api, world.admin, start="2026-01-01T00:00:00", end="2026-01-01T06:00:00+02:00"
        )
        assert (body["start"], body["end"]) == ("2026-01-01T00:00:00Z", "2026-01-01T04:00:00Z")
