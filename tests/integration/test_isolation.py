"""Isolation matrix, generated from the app's route table: every route that names a
resource is called by a tenant admin of another tenant, by a user of the same tenant who
is not a member of the project, and by a viewer, for read and write, against the real
API and PostgreSQL.

Expected: another tenant's admin gets 404 everywhere (no existence leak); a non-member
gets 404 on the project's resources; a viewer reads (2xx) but cannot write (403).
Write routes need a valid body so the check, not request validation, answers: a new
route without an entry in `BODIES` fails here until one is added. Collection routes that
name a project in their `project_id` query parameter get the same read checks.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from api.app import create_app
from control_plane.clusters.tables import Cluster
from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.endpoints.tables import Endpoint
from control_plane.identity.tables import ProjectRole
from control_plane.models.tables import Model
from control_plane.routing.schemas import CooldownSettings, RouterTarget
from control_plane.routing.tables import Router
from control_plane.workflow_runs.repository import WorkflowRunRepository
from tests.fixtures.identity import Actor, IdentityFactory
from workflows.contracts.common import Progress, ResourceRef, RunRecord, RunStatus

WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}
# Routes about the caller's own tenant, or without a resource of a project in the path.
TENANT_ROUTES = {"/api/v1/tenants/{tenant_id}"}
# Tenant-owned resources every user of the tenant reads and only tenant admins write.
TENANT_READABLE = ("/api/v1/clusters/",)
# Resources of a project addressed by their own id (the world's model is a project's).
PROJECT_OWNED = ("/api/v1/models/", "/api/v1/endpoints/", "/api/v1/routers/")

# Collection routes that take a project as the `project_id` query parameter: checked like
# the project's own routes (another tenant's admin and a non-member get 404, a viewer
# reads). Every such route is listed here or, with the reason, in `PROJECT_FILTERS`.
PROJECT_QUERY_ROUTES = (
    "/api/v1/models",
    "/api/v1/endpoints",
    "/api/v1/routers",
    "/api/v1/usage",
)
PROJECT_FILTERS = {
    "/api/v1/workflows": "narrows the runs the caller sees: another project lists nothing",
    "/api/v1/audit": "tenant admins only",
}

BODIES: dict[tuple[str, str], dict[str, Any] | None] = {
    ("PATCH", "/api/v1/tenants/{tenant_id}"): {"display_name": "Renamed"},
    ("PATCH", "/api/v1/users/{user_id}"): {"display_name": "Renamed"},
    ("POST", "/api/v1/users/{user_id}/reset-password"): None,
    ("PATCH", "/api/v1/projects/{project_id}"): {"description": "changed"},
    ("DELETE", "/api/v1/projects/{project_id}"): None,
    ("POST", "/api/v1/projects/{project_id}/members"): {"user_id": "{user_id}", "role": "viewer"},
    ("PATCH", "/api/v1/projects/{project_id}/members/{user_id}"): {"role": "member"},
    ("DELETE", "/api/v1/projects/{project_id}/members/{user_id}"): None,
    ("POST", "/api/v1/projects/{project_id}/api-keys"): {
        "name": "k",
        "scopes": ["projects:read"],
    },
    ("POST", "/api/v1/projects/{project_id}/api-keys/{key_id}/revoke"): None,
    ("POST", "/api/v1/workflows/{workflow_id}/cancel"): None,
    ("POST", "/api/v1/projects/{project_id}/credentials"): {
        "name": "second",
        "provider": "openai",
        "api_key": "sk-isolation-test-secret",
    },
    ("PATCH", "/api/v1/projects/{project_id}/credentials/{credential_id}"): {"name": "renamed"},
    ("DELETE", "/api/v1/projects/{project_id}/credentials/{credential_id}"): None,
    ("PATCH", "/api/v1/credentials/{credential_id}"): {"name": "renamed"},
    ("DELETE", "/api/v1/credentials/{credential_id}"): None,
    ("POST", "/api/v1/clusters/{cluster_id}/refresh"): None,
    ("DELETE", "/api/v1/clusters/{cluster_id}"): None,
    ("DELETE", "/api/v1/models/{model_id}"): None,
    ("POST", "/api/v1/models/{model_id}/rescan"): None,
    ("POST", "/api/v1/models/{model_id}/license/approve"): {"reason": "ok"},
    ("POST", "/api/v1/models/{model_id}/license/reject"): {"reason": "no"},
    ("PATCH", "/api/v1/endpoints/{endpoint_id}/autoscale"): {"min_replicas": 1, "max_replicas": 2},
    ("POST", "/api/v1/endpoints/{endpoint_id}/scale"): {"replicas": 1},
    ("DELETE", "/api/v1/endpoints/{endpoint_id}"): None,
    ("PATCH", "/api/v1/routers/{router_id}"): {"description": "changed"},
    ("DELETE", "/api/v1/routers/{router_id}"): None,
}


@dataclass
class World:
    owner: Actor
    viewer: Actor
    non_member: Actor
    outsider: Actor
    params: dict[str, str]


def resource_routes() -> list[tuple[str, str]]:
    schema = create_app(Settings(_env_file=None, environment="test")).openapi()
    return [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        if "{" in path
        for method in sorted(operations)
    ]


ROUTES = resource_routes()


def project_query_routes() -> list[str]:
    schema = create_app(Settings(_env_file=None, environment="test")).openapi()
    return [
        path
        for path, operations in schema["paths"].items()
        if "{" not in path
        and any(p["name"] == "project_id" for p in operations.get("get", {}).get("parameters", []))
    ]


async def build_world(
    api: httpx.AsyncClient, identities: IdentityFactory, settings: Settings
) -> World:
    tenant = await identities.tenant()
    other = await identities.tenant()
    owner = await identities.user(tenant)
    viewer = await identities.user(tenant)
    non_member = await identities.user(tenant)
    outsider = await identities.user(other, admin=True)
    project = await identities.project(tenant)
    await identities.member(project, owner, ProjectRole.OWNER)
    await identities.member(project, viewer, ProjectRole.VIEWER)
    key = await api.post(
        f"/api/v1/projects/{project.id}/api-keys",
        json={"name": "k", "scopes": ["projects:read"]},
        headers=owner.headers,
    )
    assert key.status_code == 201, key.text
    credential = await api.post(
        f"/api/v1/projects/{project.id}/credentials",
        json={"name": "first", "provider": "openai", "api_key": "sk-isolation-test-secret"},
        headers=owner.headers,
    )
    workflow_id = f"isolation-{uuid.uuid4()}"
    engine = create_engine(settings.database)
    try:
        async with session_scope(create_sessionmaker(engine)) as session:
            await WorkflowRunRepository(session).upsert(
                RunRecord(
                    workflow_id=workflow_id,
                    run_id=str(uuid.uuid4()),
                    kind="DiagnoseSystem",
                    resource=ResourceRef(kind="test", tenant_id=tenant.id, project_id=project.id),
                    status=RunStatus.COMPLETED,
                    progress=Progress(status=RunStatus.COMPLETED),
                    started_at=tenant.created_at,
                    finished_at=tenant.created_at,
                )
            )
            cluster = Cluster(
                tenant_id=tenant.id,
                name="isolated",
                kind="local",
                server_url=f"local://isolation-{uuid.uuid4()}",
                namespace="unused",
                status="available",
            )
            session.add(cluster)
            model = Model(
                tenant_id=tenant.id,
                project_id=project.id,
                name="isolated",
                source_kind="local",
                source_ref="/models/isolated",
                status="ready",
            )
            session.add(model)
            endpoint = Endpoint(
                tenant_id=tenant.id,
                project_id=project.id,
                name="isolated",
                engine="simulator",
                status="running",
                cluster_id=cluster.id,
            )
            session.add(endpoint)
            router = Router(
                tenant_id=tenant.id,
                project_id=project.id,
                name="isolated-router",
                targets=[RouterTarget(endpoint_id=endpoint.id).model_dump(mode="json")],
                cooldown=CooldownSettings().model_dump(mode="json"),
            )
            session.add(router)
    finally:
        await engine.dispose()
    params = {
        "tenant_id": str(tenant.id),
        "project_id": str(project.id),
        "user_id": str(owner.user.id),
        "key_id": key.json()["id"],
        "workflow_id": workflow_id,
        "cluster_id": str(cluster.id),
        "model_id": str(model.id),
        "endpoint_id": str(endpoint.id),
        "router_id": str(router.id),
    }
    if credential.status_code == 201:
        params["credential_id"] = credential.json()["id"]
    return World(owner, viewer, non_member, outsider, params)


def fill(template: str, params: dict[str, str]) -> str:
    for name, value in params.items():
        template = template.replace("{" + name + "}", value)
    assert "{" not in template, f"no value for a path parameter of {template}: extend the world"
    return template


async def call(
    api: httpx.AsyncClient, actor: Actor, method: str, path: str, world: World
) -> httpx.Response:
    body = None
    if method in WRITE_METHODS:
        assert (method, path) in BODIES, f"add a valid example body for {method} {path} to BODIES"
        template = BODIES[(method, path)]
        if template is not None:
            body = {
                k: fill(v, world.params) if isinstance(v, str) else v for k, v in template.items()
            }
    return await api.request(
        method, fill(path, world.params), json=body, headers=actor.headers, timeout=30
    )


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_route_isolation(
    method: str,
    path: str,
    anonymous_api: httpx.AsyncClient,
    identities: IdentityFactory,
    settings: Settings,
) -> None:
    world = await build_world(anonymous_api, identities, settings)
    if "{credential_id}" in path and "credential_id" not in world.params:
        pytest.fail("credentials could not be created for the world")
    tenant_wide = (
        not path.startswith(("/api/v1/projects/", *PROJECT_OWNED)) and "{workflow_id}" not in path
    )

    outsider = await call(anonymous_api, world.outsider, method, path, world)
    assert outsider.status_code == 404, f"other tenant: {outsider.status_code} {outsider.text}"

    if path in TENANT_ROUTES:
        return
    non_member = await call(anonymous_api, world.non_member, method, path, world)
    viewer = await call(anonymous_api, world.viewer, method, path, world)
    if path.startswith(TENANT_READABLE):
        for response in (non_member, viewer):
            if method in WRITE_METHODS:
                assert response.status_code == 403, f"user write: {response.text}"
            else:
                assert 200 <= response.status_code < 300, f"user read: {response.text}"
        return
    if tenant_wide:
        # Users and tenant-wide credentials: plain users neither see nor change them.
        assert non_member.status_code in (403, 404), non_member.text
        assert viewer.status_code in (403, 404), viewer.text
        return
    assert non_member.status_code == 404, f"non-member: {non_member.status_code} {non_member.text}"
    if method in WRITE_METHODS:
        assert viewer.status_code == 403, f"viewer write: {viewer.status_code} {viewer.text}"
    else:
        assert 200 <= viewer.status_code < 300, f"viewer read: {viewer.status_code} {viewer.text}"


def test_every_project_query_route_is_in_the_matrix() -> None:
    assert sorted(project_query_routes()) == sorted([*PROJECT_QUERY_ROUTES, *PROJECT_FILTERS])


@pytest.mark.parametrize("path", PROJECT_QUERY_ROUTES)
async def test_project_query_isolation(
    path: str,
    anonymous_api: httpx.AsyncClient,
    identities: IdentityFactory,
    settings: Settings,
) -> None:
    world = await build_world(anonymous_api, identities, settings)
    query = {"project_id": world.params["project_id"]}

    async def get(actor: Actor) -> httpx.Response:
        return await anonymous_api.get(path, params=query, headers=actor.headers, timeout=30)

    outsider = await get(world.outsider)
    assert outsider.status_code == 404, f"other tenant: {outsider.status_code} {outsider.text}"
    non_member = await get(world.non_member)
    assert non_member.status_code == 404, f"non-member: {non_member.status_code} {non_member.text}"
    viewer = await get(world.viewer)
    assert viewer.status_code == 200, f"viewer read: {viewer.status_code} {viewer.text}"
