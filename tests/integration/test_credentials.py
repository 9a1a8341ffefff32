"""Credentials end to end: real users call the real API, rows land encrypted in real
PostgreSQL, every change is audited, and `cpctl credentials rotate-master-key` (a real
subprocess) re-wraps every data key without touching a ciphertext."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from pydantic import SecretStr

from control_plane.core.codec import generate_key
from control_plane.core.config import Settings, VaultSettings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.core.errors import NotFound
from control_plane.credentials.crypto import Vault
from control_plane.credentials.service import reveal
from control_plane.identity.tables import Project, ProjectRole, Tenant
from tests.fixtures.identity import Actor, IdentityFactory
from tests.fixtures.stack import ApiServer

OLD_KEY = generate_key()
NEW_KEY = generate_key()
OPENAI_KEY = "sk-proj-" + "Zq7" * 12 + "wxyz"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# Long enough that finding any part of it in a response or a row would mean a leak.
LEAK_PROBES = (OPENAI_KEY, OPENAI_KEY[:-4], OPENAI_KEY[8:30], AWS_SECRET, AWS_SECRET[:-4])


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """This module's API seals credentials with the master key `old`."""
    return settings.model_copy(
        update={"vault": VaultSettings(master_keys={"old": SecretStr(OLD_KEY)}, active_key="old")}
    )


@dataclass
class World:
    tenant: Tenant
    project: Project
    other_project: Project
    admin: Actor
    member: Actor
    viewer: Actor
    outsider: Actor  # same tenant, no membership
    stranger: Actor  # admin of another tenant


@pytest_asyncio.fixture(loop_scope="session")
async def world(identities: IdentityFactory) -> World:
    tenant = await identities.tenant()
    project = await identities.project(tenant)
    other_project = await identities.project(tenant)
    admin = await identities.user(tenant, admin=True)
    member = await identities.user(tenant)
    viewer = await identities.user(tenant)
    await identities.member(project, member, ProjectRole.MEMBER)
    await identities.member(other_project, member, ProjectRole.MEMBER)
    await identities.member(project, viewer, ProjectRole.VIEWER)
    outsider = await identities.user(tenant)
    stranger = await identities.user(await identities.tenant(), admin=True)
    return World(tenant, project, other_project, admin, member, viewer, outsider, stranger)


@pytest_asyncio.fixture(loop_scope="session")
async def client(api_server: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    url = settings.database.url.get_secret_value().replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(url)
    yield conn
    await conn.close()


def path(project: Project | None, credential_id: str | None = None) -> str:
    base = f"/api/v1/projects/{project.id}/credentials" if project else "/api/v1/credentials"
    return f"{base}/{credential_id}" if credential_id else base


def openai(name: str = "openai-prod", **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "api_key": OPENAI_KEY, **extra}


def assert_no_secret(response: httpx.Response) -> None:
    for probe in LEAK_PROBES:
        assert probe not in response.text


async def create(
    client: httpx.AsyncClient, actor: Actor, project: Project | None, body: dict[str, Any]
) -> dict[str, Any]:
    response = await client.post(path(project), json=body, headers=actor.headers)
    assert response.status_code == 201, response.text
    assert_no_secret(response)
    created: dict[str, Any] = response.json()
    return created


class TestLifecycle:
    async def test_create_list_get_patch_delete(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        member, project = world.member, world.project
        created = await create(
            client, member, project, openai(base_url="https://llm.example.com/v1")
        )
        assert created["provider"] == "openai"
        assert created["project_id"] == str(project.id)
        assert created["config"] == {"base_url": "https://llm.example.com/v1"}
        assert created["masked"] == {"api_key": "sk-proj-...wxyz"}
        assert created["status"] == "active"
        assert created["created_by"] == str(member.user.id)
        cid = created["id"]

        await create(
            client,
            member,
            project,
            {
                "name": "aws",
                "provider": "aws",
                "access_key_id": "AKIAEXAMPLE",
                "secret_access_key": AWS_SECRET,
            },
        )
        listed = await client.get(path(project), headers=member.headers)
        assert_no_secret(listed)
        assert [c["name"] for c in listed.json()["items"]] == ["aws", "openai-prod"]
        assert listed.json()["total"] == 2
        only_openai = await client.get(
            path(project), params={"provider": "openai"}, headers=member.headers
        )
        assert [c["id"] for c in only_openai.json()["items"]] == [cid]
        paged = await client.get(
            path(project), params={"limit": 1, "page": 2, "sort": "name"}, headers=member.headers
        )
        assert [c["name"] for c in paged.json()["items"]] == ["openai-prod"]
        assert paged.json()["total"] == 2

        got = await client.get(path(project, cid), headers=member.headers)
        assert got.status_code == 200
        assert got.json() == created

        renamed = await client.patch(
            path(project, cid),
            json={"name": "openai-main", "fields": {"organization": "org-42"}},
            headers=member.headers,
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["name"] == "openai-main"
        assert renamed.json()["config"] == {
            "base_url": "https://llm.example.com/v1",
            "organization": "org-42",
        }
        assert renamed.json()["masked"] == {"api_key": "sk-proj-...wxyz"}

        replaced = await client.patch(
            path(project, cid),
            json={"fields": {"api_key": "sk-proj-replacement-key-0000-9876", "base_url": None}},
            headers=member.headers,
        )
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["masked"] == {"api_key": "sk-proj-...9876"}
        assert replaced.json()["config"] == {"organization": "org-42"}
        assert "replacement" not in replaced.text

        deleted = await client.delete(path(project, cid), headers=member.headers)
        assert deleted.status_code == 204
        assert (await client.get(path(project, cid), headers=member.headers)).status_code == 404
        assert (await client.delete(path(project, cid), headers=member.headers)).status_code == 404
        names = [
            c["name"]
            for c in (await client.get(path(project), headers=member.headers)).json()["items"]
        ]
        assert names == ["aws"]

    async def test_a_deleted_credentials_name_is_free_and_its_secret_destroyed(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Connection
    ) -> None:
        first = await create(client, world.member, world.project, openai())
        await client.delete(path(world.project, first["id"]), headers=world.member.headers)
        second = await create(client, world.member, world.project, openai())
        assert second["id"] != first["id"]
        row = await db.fetchrow(
            "SELECT status, ciphertext, wrapped_key, masked FROM credential WHERE id = $1",
            uuid.UUID(first["id"]),
        )
        assert row["status"] == "deleted"
        assert row["ciphertext"] == b""
        assert row["wrapped_key"] == b""
        assert json.loads(row["masked"]) == {}

    async def test_tenant_wide_credentials_are_written_by_admins_and_read_by_all(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        hf = {"name": "hf", "provider": "huggingface", "token": "hf_" + "a1B2c3D4" * 4}
        forbidden = await client.post(path(None), json=hf, headers=world.member.headers)
        assert forbidden.status_code == 403
        created = await create(client, world.admin, None, hf)
        assert created["project_id"] is None
        assert created["masked"] == {"token": "hf_...c3D4"}
        for reader in (world.member, world.viewer, world.outsider):
            listed = await client.get(path(None), headers=reader.headers)
            assert [c["name"] for c in listed.json()["items"]] == ["hf"]
        # It belongs to the tenant, not to a project's own list.
        in_project = await client.get(path(world.project), headers=world.member.headers)
        assert in_project.json()["total"] == 0
        not_there = await client.get(
            path(world.project, created["id"]), headers=world.admin.headers
        )
        assert not_there.status_code == 404
        patched = await client.patch(
            path(None, created["id"]), json={"name": "hf-shared"}, headers=world.admin.headers
        )
        assert patched.json()["name"] == "hf-shared"
        member_delete = await client.delete(path(None, created["id"]), headers=world.member.headers)
        assert member_delete.status_code == 403
        deleted = await client.delete(path(None, created["id"]), headers=world.admin.headers)
        assert deleted.status_code == 204


class TestStorage:
    async def test_rows_differ_per_record_and_never_hold_the_secret(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Connection
    ) -> None:
        a = await create(client, world.member, world.project, openai("a"))
        b = await create(client, world.member, world.project, openai("b"))
        rows = {
            str(r["id"]): r
            for r in await db.fetch(
                "SELECT * FROM credential WHERE id = ANY($1::uuid[])",
                [uuid.UUID(a["id"]), uuid.UUID(b["id"])],
            )
        }
        row_a, row_b = rows[a["id"]], rows[b["id"]]
        for column in ("ciphertext", "nonce", "wrapped_key", "key_nonce"):
            assert row_a[column] != row_b[column], column
        assert row_a["master_key_id"] == "old"
        for row in (row_a, row_b):
            dump = repr(dict(row)).encode() + b"".join(
                v for v in row.values() if isinstance(v, bytes)
            )
            for probe in LEAK_PROBES:
                assert probe.encode() not in dump

    async def test_reveal_gives_activities_the_secret_within_scope_only(
        self, client: httpx.AsyncClient, world: World, settings: Settings
    ) -> None:
        own = await create(client, world.member, world.project, openai(organization="org-1"))
        shared = await create(
            client,
            world.admin,
            None,
            {"name": "claude", "provider": "anthropic", "api_key": "x" * 40},
        )
        vault = Vault.from_settings(settings.vault)
        engine = create_engine(settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                fields = await reveal(
                    session,
                    vault,
                    uuid.UUID(own["id"]),
                    tenant_id=world.tenant.id,
                    project_id=world.project.id,
                )
                assert fields == {
                    "provider": "openai",
                    "api_key": OPENAI_KEY,
                    "organization": "org-1",
                }
                # A tenant-wide credential serves every project of its tenant.
                claude = await reveal(
                    session, vault, uuid.UUID(shared["id"]), project_id=world.other_project.id
                )
                assert claude["api_key"] == "x" * 40
                with pytest.raises(NotFound):
                    await reveal(
                        session, vault, uuid.UUID(own["id"]), project_id=world.other_project.id
                    )
                with pytest.raises(NotFound):
                    await reveal(session, vault, uuid.UUID(own["id"]), tenant_id=uuid.uuid4())
        finally:
            await engine.dispose()


class TestPermissions:
    async def test_viewer_reads_but_cannot_write(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        created = await create(client, world.member, world.project, openai())
        denied = await client.post(
            path(world.project), json=openai("v"), headers=world.viewer.headers
        )
        assert denied.status_code == 403
        assert denied.headers["content-type"] == "application/problem+json"
        for method, body in (("PATCH", {"name": "renamed"}), ("DELETE", None)):
            response = await client.request(
                method, path(world.project, created["id"]), json=body, headers=world.viewer.headers
            )
            assert response.status_code == 403, method
        assert (
            await client.get(path(world.project), headers=world.viewer.headers)
        ).status_code == 200
        got = await client.get(path(world.project, created["id"]), headers=world.viewer.headers)
        assert got.status_code == 200

    @pytest.mark.parametrize("who", ["outsider", "stranger"])
    async def test_callers_outside_the_project_get_404(
        self, client: httpx.AsyncClient, world: World, who: str
    ) -> None:
        created = await create(client, world.member, world.project, openai())
        actor: Actor = getattr(world, who)
        for method, url, body in (
            ("GET", path(world.project), None),
            ("POST", path(world.project), openai("mine")),
            ("GET", path(world.project, created["id"]), None),
            ("PATCH", path(world.project, created["id"]), {"name": "x"}),
            ("DELETE", path(world.project, created["id"]), None),
        ):
            response = await client.request(method, url, json=body, headers=actor.headers)
            assert response.status_code == 404, (method, url)
            assert response.json()["type"] == "urn:control-plane:problem:not-found"

    async def test_another_tenants_credential_is_404_for_its_admin(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        created = await create(client, world.admin, None, openai("shared"))
        response = await client.get(path(None, created["id"]), headers=world.stranger.headers)
        assert response.status_code == 404
        assert (await client.get(path(None), headers=world.stranger.headers)).json()["total"] == 0

    async def test_anonymous_callers_get_401(self, client: httpx.AsyncClient, world: World) -> None:
        assert (await client.get(path(world.project))).status_code == 401
        assert (await client.post(path(None), json=openai())).status_code == 401


class TestValidation:
    async def test_name_conflict_is_409_within_a_scope_only(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        await create(client, world.member, world.project, openai("dup"))
        again = await client.post(
            path(world.project), json=openai("dup"), headers=world.member.headers
        )
        assert again.status_code == 409
        assert again.json()["type"] == "urn:control-plane:problem:conflict"
        await create(client, world.member, world.other_project, openai("dup"))
        await create(client, world.admin, None, openai("dup"))
        other = await create(client, world.member, world.project, openai("other"))
        rename = await client.patch(
            path(world.project, other["id"]), json={"name": "dup"}, headers=world.member.headers
        )
        assert rename.status_code == 409

    @pytest.mark.parametrize(
        ("body", "loc"),
        [
            ({"name": "o", "provider": "openai"}, ["body", "openai", "api_key"]),
            (
                {"name": "o", "provider": "openai", "api_key": "k", "apikey": "k"},
                ["body", "openai", "apikey"],
            ),
            (
                {"name": "o", "provider": "openai", "api_key": "k", "base_url": "ftp://x"},
                ["body", "openai", "base_url"],
            ),
            (
                {"name": "g", "provider": "gcp", "service_account_json": '{"type": "user"}'},
                ["body", "gcp", "service_account_json"],
            ),
            (
                {"name": "k", "provider": "kubeconfig", "kubeconfig": "apiVersion: v1\n"},
                ["body", "kubeconfig", "kubeconfig"],
            ),
            (
                {"name": "a", "provider": "azure", "tenant_id": "t", "client_secret": "s"},
                ["body", "azure", "client_id"],
            ),
            (
                {"name": "bad name", "provider": "anthropic", "api_key": "k"},
                ["body", "anthropic", "name"],
            ),
        ],
    )
    async def test_provider_schema_violations_are_422_naming_the_field(
        self, client: httpx.AsyncClient, world: World, body: dict[str, Any], loc: list[str]
    ) -> None:
        response = await client.post(path(world.project), json=body, headers=world.member.headers)
        assert response.status_code == 422, response.text
        assert loc in [e["loc"] for e in response.json()["errors"]]

    async def test_unknown_provider_is_422(self, client: httpx.AsyncClient, world: World) -> None:
        response = await client.post(
            path(world.project),
            json={"name": "x", "provider": "oracle"},
            headers=world.member.headers,
        )
        assert response.status_code == 422

    async def test_patch_is_validated_against_the_stored_provider(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        created = await create(client, world.member, world.project, openai())
        url = path(world.project, created["id"])
        for fields, loc in (
            ({"region": "eu"}, ["body", "fields", "region"]),
            ({"api_key": None}, ["body", "fields", "api_key"]),
            ({"base_url": "not a url"}, ["body", "fields", "base_url"]),
            ({"provider": "anthropic"}, ["body", "fields", "provider"]),
        ):
            response = await client.patch(
                url, json={"fields": fields}, headers=world.member.headers
            )
            assert response.status_code == 422, fields
            assert loc in [e["loc"] for e in response.json()["errors"]], response.json()
        unchanged = await client.get(url, headers=world.member.headers)
        assert unchanged.json()["updated_at"] == created["updated_at"]
        # Absent or null at the top level: nothing changes.
        same = await client.patch(
            url, json={"name": None, "fields": None}, headers=world.member.headers
        )
        assert same.status_code == 200
        assert same.json() == created


class TestAudit:
    async def test_every_change_is_audited_without_secrets(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Connection
    ) -> None:
        created = await create(client, world.member, world.project, openai())
        url = path(world.project, created["id"])
        await client.patch(
            url, json={"fields": {"api_key": OPENAI_KEY[::-1]}}, headers=world.member.headers
        )
        await client.delete(url, headers=world.member.headers)
        await client.post(path(world.project), json=openai("v"), headers=world.viewer.headers)

        rows = await db.fetch(
            "SELECT action, actor_id, project_id, tenant_id, details FROM audit_event"
            " WHERE resource_id = $1 ORDER BY seq",
            created["id"],
        )
        assert [r["action"] for r in rows] == [
            "credential.create",
            "credential.update",
            "credential.delete",
        ]
        for row in rows:
            assert row["actor_id"] == str(world.member.user.id)
            assert row["project_id"] == world.project.id
            assert row["tenant_id"] == world.tenant.id
            for probe in (*LEAK_PROBES, OPENAI_KEY[::-1][:-4]):
                assert probe not in row["details"]
        assert json.loads(rows[1]["details"])["changed"] == ["api_key"]


def cpctl_env(
    settings: Settings, data_dir: Path, keys: dict[str, str], active: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_")}
    env.update(
        CP_ENVIRONMENT="test",
        CP_DATA_DIR=str(data_dir),
        CP_DATABASE__URL=settings.database.url.get_secret_value(),
        CP_VAULT__MASTER_KEYS=json.dumps(keys),
        CP_VAULT__ACTIVE_KEY=active,
        CP_LOG_LEVEL="warning",
    )
    return env


async def cpctl(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class TestMasterKeyRotation:
    async def test_rotation_rewraps_every_credential_and_old_key_can_go(
        self,
        client: httpx.AsyncClient,
        world: World,
        db: asyncpg.Connection,
        settings: Settings,
        tmp_path: Path,
    ) -> None:
        ids = [
            (await create(client, world.member, world.project, openai(f"c{i}")))["id"]
            for i in range(3)
        ]
        ids.append((await create(client, world.admin, None, openai("shared")))["id"])
        gone = await create(client, world.member, world.project, openai("gone"))
        await client.delete(path(world.project, gone["id"]), headers=world.member.headers)
        before = {
            str(r["id"]): r
            for r in await db.fetch("SELECT id, ciphertext, nonce, wrapped_key FROM credential")
        }

        env = cpctl_env(settings, tmp_path, {"old": OLD_KEY, "new": NEW_KEY}, "new")
        code, out, err = await cpctl(env, "credentials", "rotate-master-key", "--batch-size", "3")
        assert code == 0, err
        assert "4 re-wrapped, 0 already current, 0 remaining (4 live credentials)" in out, out
        after = {
            str(r["id"]): r
            for r in await db.fetch(
                "SELECT id, ciphertext, nonce, wrapped_key, master_key_id FROM credential"
                " WHERE status = 'active'"
            )
        }
        assert sorted(after) == sorted(ids)
        for cid, row in after.items():
            assert row["master_key_id"] == "new"
            assert row["ciphertext"] == before[cid]["ciphertext"]
            assert row["nonce"] == before[cid]["nonce"]
            assert row["wrapped_key"] != before[cid]["wrapped_key"]

        code, out, err = await cpctl(env, "credentials", "rotate-master-key")
        assert code == 0, err
        assert "0 re-wrapped, 4 already current, 0 remaining" in out, out

        # The old key removed from settings: every credential still opens.
        only_new = Vault.from_settings(VaultSettings(master_keys={"new": SecretStr(NEW_KEY)}))
        engine = create_engine(settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                for cid in ids:
                    fields = await reveal(session, only_new, uuid.UUID(cid))
                    assert fields["api_key"] == OPENAI_KEY
        finally:
            await engine.dispose()

        audited = await db.fetch(
            "SELECT actor_kind, details FROM audit_event WHERE action = 'credential.rewrap'"
        )
        assert [r["actor_kind"] for r in audited] == ["system", "system"]
        rewrapped = [cid for r in audited for cid in json.loads(r["details"])["credential_ids"]]
        assert sorted(rewrapped) == sorted(ids)

    async def test_rotation_without_the_old_key_fails_loudly(
        self, client: httpx.AsyncClient, world: World, settings: Settings, tmp_path: Path
    ) -> None:
        await create(client, world.member, world.project, openai())
        env = cpctl_env(settings, tmp_path, {"new": NEW_KEY}, "new")
        code, out, err = await cpctl(env, "credentials", "rotate-master-key")
        assert code == 1
        assert "master key 'old' is not configured" in err
        assert OPENAI_KEY not in out + err
