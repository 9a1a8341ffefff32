"""Routers end to end: real users call the real API on real PostgreSQL and Redis.

Routers need no workflow, so the endpoints and cloud models they point at are inserted
as rows (an endpoint `running`, a model `ready`...) rather than deployed or onboarded:
what is under test is the router's CRUD, its rules, its permissions and the change
notices gateways listen to, not deployment. One endpoint is deleted through the API (its
workflow never ran, so the deletion completes at once) to show what a router then reads.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.endpoints.tables import Endpoint
from control_plane.identity.tables import Project, ProjectRole, Tenant
from control_plane.models.tables import Model
from control_plane.routing.changes import CHANNEL
from tests.fixtures.identity import Actor, IdentityFactory

ROUTERS = "/api/v1/routers"


@dataclass
class World:
    settings: Settings
    tenant: Tenant
    project: Project
    other_project: Project
    member: Actor  # member of both projects
    viewer: Actor
    outsider: Actor  # same tenant, no membership
    stranger: Actor  # admin of another tenant
    stranger_tenant: Tenant
    stranger_project: Project

    async def add(self, row: Endpoint | Model) -> str:
        engine = create_engine(self.settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                session.add(row)
        finally:
            await engine.dispose()
        return str(row.id)

    async def endpoint(
        self,
        name: str | None = None,
        *,
        status: str = "running",
        project: Project | None = None,
        tenant: Tenant | None = None,
    ) -> str:
        return await self.add(
            Endpoint(
                tenant_id=(tenant or self.tenant).id,
                project_id=(project or self.project).id,
                name=name or f"ep-{uuid.uuid4().hex[:8]}",
                engine="simulator",
                status=status,
            )
        )

    async def model(
        self,
        *,
        status: str = "ready",
        source_kind: str = "cloud",
        project: Project | None = None,
        tenant_wide: bool = False,
    ) -> str:
        return await self.add(
            Model(
                tenant_id=self.tenant.id,
                project_id=None if tenant_wide else (project or self.project).id,
                name=f"gpt-{uuid.uuid4().hex[:8]}",
                source_kind=source_kind,
                source_ref="openai/gpt-4o-mini" if source_kind == "cloud" else "/models/x",
                status=status,
            )
        )


@pytest_asyncio.fixture(loop_scope="session")
async def world(identities: IdentityFactory, settings: Settings) -> World:
    tenant = await identities.tenant()
    project = await identities.project(tenant)
    other_project = await identities.project(tenant)
    member = await identities.user(tenant)
    viewer = await identities.user(tenant)
    await identities.member(project, member, ProjectRole.MEMBER)
    await identities.member(other_project, member, ProjectRole.MEMBER)
    await identities.member(project, viewer, ProjectRole.VIEWER)
    outsider = await identities.user(tenant)
    stranger_tenant = await identities.tenant()
    stranger = await identities.user(stranger_tenant, admin=True)
    stranger_project = await identities.project(stranger_tenant)
    return World(
        settings,
        tenant,
        project,
        other_project,
        member,
        viewer,
        outsider,
        stranger,
        stranger_tenant,
        stranger_project,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def client(anonymous_api: httpx.AsyncClient, world: World) -> httpx.AsyncClient:
    """Calls as the project member unless a test passes other headers."""
    anonymous_api.headers.update(world.member.headers)
    return anonymous_api


def body(world: World, *targets: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"project_id": str(world.project.id), "name": "chat", "targets": list(targets), **fields}


async def create(client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(ROUTERS, json=payload)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    detail: str = response.json()["detail"]
    return detail


class TestLifecycle:
    async def test_create_read_list_patch_delete(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        first = await world.endpoint("sim-a")
        second = await world.endpoint("sim-b")
        spare = await world.endpoint("sim-spare")
        cloud = await world.model()
        created = await create(
            client,
            body(
                world,
                {"endpoint_id": first, "weight": 3, "rpm": 600},
                {"endpoint_id": second, "tpm": 100_000},
                {"model_id": cloud, "weight": 0.5},
                description="chat traffic",
                strategy="least_busy",
                fallbacks=[{"endpoint_id": spare}],
            ),
        )
        assert created["name"] == "chat"
        assert created["project_id"] == str(world.project.id)
        assert created["tenant_id"] == str(world.tenant.id)
        assert created["strategy"] == "least_busy"
        assert created["status"] == "active"
        assert created["created_by"] == str(world.member.user.id)
        assert created["deleted_at"] is None
        [a, b, c] = created["targets"]
        assert (a["endpoint_id"], a["weight"], a["rpm"], a["tpm"]) == (first, 3.0, 600, None)
        assert a["target"] == {"kind": "endpoint", "name": "sim-a", "status": "running"}
        assert (b["weight"], b["tpm"]) == (1.0, 100_000)
        assert c["model_id"] == cloud
        assert c["target"]["kind"] == "model"
        assert c["target"]["status"] == "ready"
        assert created["fallbacks"] == [
            {
                "router_id": None,
                "endpoint_id": spare,
                "model_id": None,
                "target": {"kind": "endpoint", "name": "sim-spare", "status": "running"},
            }
        ]
        router_id = created["id"]

        fetched = await client.get(f"{ROUTERS}/{router_id}")
        assert fetched.status_code == 200
        assert fetched.json() == created

        other = await create(
            client, body(world, {"endpoint_id": first}, name="embed", strategy="usage_based")
        )
        listed = await client.get(ROUTERS, params={"project_id": str(world.project.id)})
        assert listed.status_code == 200
        assert [r["name"] for r in listed.json()["items"]] == ["chat", "embed"]
        assert listed.json()["total"] == 2
        page = await client.get(
            ROUTERS,
            params={"project_id": str(world.project.id), "limit": 1, "page": 2, "sort": "name"},
        )
        assert page.json()["items"][0]["name"] == "embed"
        assert (page.json()["total"], page.json()["page"], page.json()["limit"]) == (2, 2, 1)
        newest_first = await client.get(ROUTERS, params={"sort": "created_at", "order": "desc"})
        assert [r["id"] for r in newest_first.json()["items"]] == [other["id"], router_id]

        patched = await client.patch(
            f"{ROUTERS}/{router_id}",
            json={
                "strategy": "lowest_latency",
                "targets": [{"endpoint_id": first, "weight": 1}, {"model_id": cloud}],
                "retries": 4,
                "timeout_s": 30,
                "cooldown": {"cooldown_s": 5},
            },
        )
        assert patched.status_code == 200, patched.text
        updated = patched.json()
        assert updated["strategy"] == "lowest_latency"
        assert [t["endpoint_id"] or t["model_id"] for t in updated["targets"]] == [first, cloud]
        assert (updated["retries"], updated["timeout_s"]) == (4, 30.0)
        # A partial cooldown keeps the other fields; untouched fields keep their values.
        assert updated["cooldown"] == {"allowed_fails": 3, "window_s": 60.0, "cooldown_s": 5.0}
        assert updated["description"] == "chat traffic"
        assert updated["fallbacks"] == created["fallbacks"]
        assert updated["updated_at"] > created["updated_at"]
        assert (await client.get(f"{ROUTERS}/{router_id}")).json() == updated

        renamed = await client.patch(f"{ROUTERS}/{router_id}", json={"name": "chat-v2"})
        assert renamed.status_code == 200
        assert renamed.json()["name"] == "chat-v2"

        deleted = await client.delete(f"{ROUTERS}/{router_id}")
        assert deleted.status_code == 204
        assert deleted.content == b""
        problem(await client.get(f"{ROUTERS}/{router_id}"), 404)
        problem(await client.patch(f"{ROUTERS}/{router_id}", json={"retries": 1}), 404)
        problem(await client.delete(f"{ROUTERS}/{router_id}"), 404)
        live = await client.get(ROUTERS, params={"project_id": str(world.project.id)})
        assert [r["name"] for r in live.json()["items"]] == ["embed"]
        gone = await client.get(ROUTERS, params={"status": "deleted"})
        [row] = gone.json()["items"]
        assert (row["id"], row["status"]) == (router_id, "deleted")
        assert row["deleted_at"] is not None

        # A deleted router frees its name.
        await create(client, body(world, {"endpoint_id": first}, name="chat-v2"))

    async def test_defaults(self, client: httpx.AsyncClient, world: World) -> None:
        created = await create(client, body(world, {"endpoint_id": await world.endpoint()}))
        assert created["strategy"] == "weighted"
        assert created["fallbacks"] == []
        assert created["description"] == ""
        assert (created["retries"], created["retry_backoff_s"], created["timeout_s"]) == (
            2,
            0.1,
            600.0,
        )
        assert created["cooldown"] == {"allowed_fails": 3, "window_s": 60.0, "cooldown_s": 30.0}
        [target] = created["targets"]
        assert (target["weight"], target["rpm"], target["tpm"]) == (1.0, None, None)

    async def test_a_deleted_target_endpoint_reads_as_deleted(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        kept = await world.endpoint("kept")
        doomed = await world.endpoint("doomed")
        created = await create(
            client,
            body(
                world,
                {"endpoint_id": kept},
                {"endpoint_id": doomed},
                fallbacks=[{"model_id": await world.model()}],
            ),
        )
        # Endpoint deletion is unchanged by routers; its workflow never ran, so the
        # deletion completes before the response.
        response = await client.delete(f"/api/v1/endpoints/{doomed}", params={"grace_s": 0})
        assert response.status_code == 202, response.text

        router = (await client.get(f"{ROUTERS}/{created['id']}")).json()
        statuses = {t["target"]["name"]: t["target"]["status"] for t in router["targets"]}
        assert statuses == {"kept": "running", "doomed": "deleted"}
        # The router still changes: only what a change adds must be usable now.
        patched = await client.patch(f"{ROUTERS}/{created['id']}", json={"retries": 0})
        assert patched.status_code == 200, patched.text
        # ... but the deleted endpoint cannot be named anew.
        fresh = await client.post(ROUTERS, json=body(world, {"endpoint_id": doomed}, name="new"))
        problem(fresh, 404)


class TestValidation:
    async def test_request_shape_is_a_422(self, client: httpx.AsyncClient, world: World) -> None:
        endpoint = await world.endpoint()
        model = await world.model()
        bad_bodies = [
            body(world, {"endpoint_id": endpoint, "weight": 0}),
            body(world, {"endpoint_id": endpoint, "weight": -1}),
            body(world, {"endpoint_id": endpoint, "rpm": 0}),
            body(world),
            body(world, {"endpoint_id": endpoint}, {"endpoint_id": endpoint, "weight": 2}),
            body(world, {"endpoint_id": endpoint, "model_id": model}),
            body(world, {"weight": 1}),
            body(world, {"endpoint_id": endpoint}, fallbacks=[{"endpoint_id": endpoint}]),
            body(world, {"endpoint_id": endpoint}, fallbacks=[{"model_id": model}] * 2),
            body(world, {"endpoint_id": endpoint}, fallbacks=[{}]),
            body(world, {"endpoint_id": endpoint}, strategy="round_robin"),
            body(world, {"endpoint_id": endpoint}, retries=6),
            body(world, {"endpoint_id": endpoint}, timeout_s=0.5),
            body(world, {"endpoint_id": endpoint}, cooldown={"window_s": 0}),
            body(world, {"endpoint_id": endpoint}, cooldown={"allowed_fails": -1}),
            body(world, {"endpoint_id": endpoint}, name="Not_DNS"),
            body(world, {"endpoint_id": endpoint}, name="x" * 64),
            body(world, *[{"endpoint_id": str(uuid.uuid4())} for _ in range(33)]),
        ]
        for payload in bad_bodies:
            response = await client.post(ROUTERS, json=payload)
            assert response.status_code == 422, (payload, response.text)
        assert (await client.get(ROUTERS)).json()["total"] == 0

    async def test_references_outside_the_project_are_404_without_a_leak(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        elsewhere = await world.endpoint(project=world.other_project)
        foreign = await world.endpoint(project=world.stranger_project, tenant=world.stranger_tenant)
        for ref in (elsewhere, foreign, str(uuid.uuid4())):
            detail = problem(
                await client.post(ROUTERS, json=body(world, {"endpoint_id": ref})), 404
            )
            assert detail == f"endpoint {ref} not found in the project"
        other_model = await world.model(project=world.other_project)
        detail = problem(
            await client.post(ROUTERS, json=body(world, {"model_id": other_model})), 404
        )
        assert detail == f"model {other_model} not found in the project or tenant"
        other_router = await create(
            client,
            {
                "project_id": str(world.other_project.id),
                "name": "elsewhere",
                "targets": [{"endpoint_id": elsewhere}],
            },
        )
        response = await client.post(
            ROUTERS,
            json=body(
                world,
                {"endpoint_id": await world.endpoint()},
                fallbacks=[{"router_id": other_router["id"]}],
            ),
        )
        assert problem(response, 404) == f"router {other_router['id']} not found in the project"

    async def test_targets_must_be_able_to_take_traffic(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        for status in ("deleting", "failed"):
            endpoint = await world.endpoint(status=status)
            detail = problem(
                await client.post(ROUTERS, json=body(world, {"endpoint_id": endpoint})), 409
            )
            assert status in detail
        deleted = await world.endpoint(status="deleted")
        problem(await client.post(ROUTERS, json=body(world, {"endpoint_id": deleted})), 404)
        for status in ("onboarding", "deprecated", "failed"):
            model = await world.model(status=status)
            detail = problem(await client.post(ROUTERS, json=body(world, {"model_id": model})), 409)
            assert "only ready models" in detail
        local = await world.model(source_kind="local")
        response = await client.post(ROUTERS, json=body(world, {"model_id": local}))
        assert "not a cloud model" in problem(response, 422)
        # A tenant-wide cloud model serves every project; a pending endpoint will serve.
        shared = await world.model(tenant_wide=True)
        pending = await world.endpoint(status="pending")
        await create(client, body(world, {"model_id": shared}, {"endpoint_id": pending}))

    async def test_patch_conflicts_are_409(self, client: httpx.AsyncClient, world: World) -> None:
        first = await world.endpoint()
        second = await world.endpoint()
        router = await create(client, body(world, {"endpoint_id": first}, name="a"))
        other = await create(
            client,
            body(world, {"endpoint_id": second}, name="b", fallbacks=[{"router_id": router["id"]}]),
        )
        url = f"{ROUTERS}/{router['id']}"

        detail = problem(
            await client.patch(url, json={"fallbacks": [{"router_id": router["id"]}]}), 409
        )
        assert "itself" in detail
        # a -> b -> a
        detail = problem(
            await client.patch(url, json={"fallbacks": [{"router_id": other["id"]}]}), 409
        )
        assert "reach itself" in detail
        # A fallback that is one of the current targets, or targets that take in a current
        # fallback: only the merged router contradicts itself.
        detail = problem(await client.patch(url, json={"fallbacks": [{"endpoint_id": first}]}), 409)
        assert "also a target" in detail
        await client.patch(url, json={"fallbacks": [{"endpoint_id": second}]})
        detail = problem(await client.patch(url, json={"targets": [{"endpoint_id": second}]}), 409)
        assert "also a target" in detail
        # Sent together, the same contradiction is a malformed request.
        response = await client.patch(
            url,
            json={"targets": [{"endpoint_id": second}], "fallbacks": [{"endpoint_id": second}]},
        )
        assert response.status_code == 422
        # A deleted router cannot become a fallback.
        await client.delete(f"{ROUTERS}/{other['id']}")
        response = await client.patch(url, json={"fallbacks": [{"router_id": other["id"]}]})
        problem(response, 404)
        # Nothing above changed the router.
        current = (await client.get(url)).json()
        assert [t["endpoint_id"] for t in current["targets"]] == [first]
        assert [f["endpoint_id"] for f in current["fallbacks"]] == [second]
        # null and absent keep the value.
        response = await client.patch(
            url, json={"name": None, "targets": None, "cooldown": {"window_s": None}}
        )
        assert response.status_code == 200
        assert response.json()["name"] == "a"
        assert response.json()["cooldown"]["window_s"] == 60.0


class TestNames:
    async def test_routers_and_endpoints_share_one_namespace(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        endpoint = await world.endpoint("taken-by-endpoint")
        router = await create(client, body(world, {"endpoint_id": endpoint}, name="taken"))

        detail = problem(
            await client.post(ROUTERS, json=body(world, {"endpoint_id": endpoint}, name="taken")),
            409,
        )
        assert "a router named 'taken'" in detail
        response = await client.post(
            ROUTERS, json=body(world, {"endpoint_id": endpoint}, name="taken-by-endpoint")
        )
        assert "an endpoint named 'taken-by-endpoint'" in problem(response, 409)
        response = await client.patch(
            f"{ROUTERS}/{router['id']}", json={"name": "taken-by-endpoint"}
        )
        assert "an endpoint named" in problem(response, 409)
        # The other way round: an endpoint cannot take a live router's name.
        response = await client.post(
            "/api/v1/endpoints",
            json={"project_id": str(world.project.id), "name": "taken", "engine": "simulator"},
        )
        assert "a router named 'taken'" in problem(response, 409)

        # Names are per project.
        elsewhere = await world.endpoint(project=world.other_project)
        await create(
            client,
            {
                "project_id": str(world.other_project.id),
                "name": "taken",
                "targets": [{"endpoint_id": elsewhere}],
            },
        )


class TestPermissions:
    async def test_a_viewer_reads_but_does_not_write(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        endpoint = await world.endpoint()
        router = await create(client, body(world, {"endpoint_id": endpoint}))
        url = f"{ROUTERS}/{router['id']}"
        viewer = world.viewer.headers
        assert (await client.get(url, headers=viewer)).json()["id"] == router["id"]
        listed = await client.get(ROUTERS, headers=viewer)
        assert [r["id"] for r in listed.json()["items"]] == [router["id"]]
        problem(
            await client.post(
                ROUTERS, json=body(world, {"endpoint_id": endpoint}, name="v"), headers=viewer
            ),
            403,
        )
        problem(await client.patch(url, json={"retries": 0}, headers=viewer), 403)
        problem(await client.delete(url, headers=viewer), 403)
        assert (await client.get(url)).json()["retries"] == 2

    async def test_outside_the_project_or_tenant_it_does_not_exist(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        endpoint = await world.endpoint()
        router = await create(client, body(world, {"endpoint_id": endpoint}))
        url = f"{ROUTERS}/{router['id']}"
        for actor in (world.outsider, world.stranger):
            headers = actor.headers
            assert (await client.get(url, headers=headers)).json()["detail"] == "router not found"
            problem(await client.patch(url, json={"retries": 0}, headers=headers), 404)
            problem(await client.delete(url, headers=headers), 404)
            problem(
                await client.post(
                    ROUTERS, json=body(world, {"endpoint_id": endpoint}, name="x"), headers=headers
                ),
                404,
            )
            listed = await client.get(ROUTERS, headers=headers)
            assert listed.json()["items"] == []
        problem(
            await client.get(
                ROUTERS,
                params={"project_id": str(world.project.id)},
                headers=world.outsider.headers,
            ),
            404,
        )


@pytest_asyncio.fixture(loop_scope="session")
async def notices(settings: Settings) -> AsyncIterator[PubSub]:
    """Subscribed to the gateways' channel before the test calls the API."""
    redis = Redis.from_url(settings.redis.url.get_secret_value())
    pubsub = redis.pubsub()
    await pubsub.subscribe(CHANNEL)
    # The subscription is in place once Redis confirms it.
    while await pubsub.get_message(timeout=5) is None:
        pass
    yield pubsub
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await redis.aclose()


async def notices_for(pubsub: PubSub, router_id: str, *, within: float) -> list[dict[str, Any]]:
    """The notices naming `router_id` that arrive within `within` seconds (other tests
    share the Redis server and may publish on the channel too)."""
    found: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + within
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is None:
            continue
        notice = json.loads(message["data"])
        if notice.get("id") == router_id:
            found.append(notice)
    return found


class TestChangeNotices:
    async def test_each_committed_change_is_announced(
        self, client: httpx.AsyncClient, world: World, notices: PubSub
    ) -> None:
        endpoint = await world.endpoint()
        router = await create(client, body(world, {"endpoint_id": endpoint}))
        notice = {"kind": "router", "id": router["id"]}
        assert await notices_for(notices, router["id"], within=1) == [notice]

        url = f"{ROUTERS}/{router['id']}"
        assert (await client.patch(url, json={"retries": 0})).status_code == 200
        assert await notices_for(notices, router["id"], within=1) == [notice]

        # Nothing committed, nothing announced.
        problem(await client.patch(url, json={"fallbacks": [{"router_id": router["id"]}]}), 409)
        assert (await client.patch(url, json={"retries": 0})).status_code == 200
        assert await notices_for(notices, router["id"], within=0.5) == []

        assert (await client.delete(url)).status_code == 204
        assert await notices_for(notices, router["id"], within=1) == [notice]
