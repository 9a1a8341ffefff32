"""Identity through the real API on real PostgreSQL and Redis: sign-in, token edge
cases, projects and members, API keys, and the audit log with its hash chain."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import jwt
import pytest

from control_plane.core.config import Settings
from tests.fixtures.identity import PASSWORD, Actor, IdentityFactory
from tests.fixtures.stack import ApiServer


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(
    client: httpx.AsyncClient, username: str, password: str = PASSWORD
) -> httpx.Response:
    return await client.post(
        "/api/v1/auth/token", data={"username": username, "password": password}
    )


def forge(settings: Settings, **overrides: object) -> str:
    """A token shaped like ours, with some claims or the key changed."""
    now = datetime.now(UTC)
    claims: dict[str, object] = {
        "sub": str(uuid.uuid4()),
        "tid": str(uuid.uuid4()),
        "iss": settings.auth.issuer,
        "aud": settings.auth.audience,
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }
    key = str(overrides.pop("key", settings.auth.jwt_secret.get_secret_value()))
    kid = str(overrides.pop("kid", settings.auth.jwt_kid))
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": kid})


class TestSignIn:
    async def test_password_login_refresh_rotation_and_logout(
        self, anonymous_api: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        tenant = await identities.tenant()
        actor = await identities.user(tenant)
        response = await login(anonymous_api, f"{tenant.slug}/{actor.user.username}")
        assert response.status_code == 200, response.text
        pair = response.json()
        me = await anonymous_api.get("/api/v1/auth/me", headers=bearer(pair["access_token"]))
        assert me.json()["username"] == actor.user.username
        assert me.json()["tenant_slug"] == tenant.slug

        refreshed = await anonymous_api.post(
            "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert refreshed.status_code == 200
        # The used refresh token is revoked by rotation.
        replay = await anonymous_api.post(
            "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert replay.status_code == 401

        new_refresh = refreshed.json()["refresh_token"]
        assert (
            await anonymous_api.post("/api/v1/auth/logout", json={"refresh_token": new_refresh})
        ).status_code == 204
        after_logout = await anonymous_api.post(
            "/api/v1/auth/refresh", json={"refresh_token": new_refresh}
        )
        assert after_logout.status_code == 401

    async def test_wrong_password_and_unknown_user_look_the_same(
        self, anonymous_api: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        tenant = await identities.tenant()
        actor = await identities.user(tenant)
        wrong = await login(anonymous_api, f"{tenant.slug}/{actor.user.username}", "nope-nope-nope")
        unknown = await login(anonymous_api, f"{tenant.slug}/nobody", "nope-nope-nope")
        assert wrong.status_code == unknown.status_code == 401
        assert wrong.json()["detail"] == unknown.json()["detail"]

    async def test_password_change_revokes_sessions(
        self, anonymous_api: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        tenant = await identities.tenant()
        actor = await identities.user(tenant)
        pair = (await login(anonymous_api, f"{tenant.slug}/{actor.user.username}")).json()
        changed = await anonymous_api.post(
            "/api/v1/auth/password",
            json={"current_password": PASSWORD, "new_password": "a brand new passphrase"},
            headers=actor.headers,
        )
        assert changed.status_code == 204
        stale = await anonymous_api.post(
            "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert stale.status_code == 401
        fresh = await login(
            anonymous_api, f"{tenant.slug}/{actor.user.username}", "a brand new passphrase"
        )
        assert fresh.status_code == 200


class TestPasswordReset:
    async def test_admin_reset_gives_a_one_time_password_and_ends_sessions(
        self, api: httpx.AsyncClient, anonymous_api: httpx.AsyncClient, admin: Actor
    ) -> None:
        user = (await api.post("/api/v1/users", json={"username": "forgetful"})).json()
        slug = (await api.get(f"/api/v1/tenants/{admin.user.tenant_id}")).json()["slug"]
        pair = (await login(anonymous_api, f"{slug}/forgetful", user["generated_password"])).json()
        reset = await api.post(f"/api/v1/users/{user['id']}/reset-password")
        assert reset.status_code == 200
        one_time = reset.json()["one_time_password"]
        stale = await anonymous_api.post(
            "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert stale.status_code == 401
        assert (await login(anonymous_api, f"{slug}/forgetful", one_time)).status_code == 200


class TestTokenEdgeCases:
    @pytest.mark.parametrize(
        ("case", "overrides", "detail"),
        [
            ("expired", {"exp": datetime.now(UTC) - timedelta(minutes=1)}, "token expired"),
            ("wrong signature", {"key": "another-signing-key-of-sufficient-length!"}, "invalid"),
            ("wrong audience", {"aud": "someone-else"}, "invalid"),
            ("wrong issuer", {"iss": "https://elsewhere"}, "invalid"),
            ("unknown kid", {"kid": "k-unknown"}, "unknown key"),
        ],
    )
    async def test_rejected_with_401(
        self,
        anonymous_api: httpx.AsyncClient,
        settings: Settings,
        case: str,
        overrides: dict[str, object],
        detail: str,
    ) -> None:
        response = await anonymous_api.get(
            "/api/v1/auth/me", headers=bearer(forge(settings, **overrides))
        )
        assert response.status_code == 401, case
        assert response.headers["content-type"] == "application/problem+json"
        assert detail in response.json()["detail"]

    async def test_alg_none_is_rejected(
        self, anonymous_api: httpx.AsyncClient, settings: Settings, admin: Actor
    ) -> None:
        claims = jwt.decode(admin.token, options={"verify_signature": False})
        unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": settings.auth.jwt_kid})
        response = await anonymous_api.get("/api/v1/auth/me", headers=bearer(unsigned))
        assert response.status_code == 401

    async def test_previous_signing_key_still_verifies(
        self, settings: Settings, identities: IdentityFactory
    ) -> None:
        tenant = await identities.tenant()
        actor = await identities.user(tenant)
        rotated = settings.model_copy(
            update={
                "auth": settings.auth.model_copy(
                    update={
                        "jwt_kid": "k2",
                        "jwt_secret": type(settings.auth.jwt_secret)("k2-" + "x" * 40),
                        "jwt_previous_keys": {"k1": settings.auth.jwt_secret},
                    }
                )
            }
        )
        server = ApiServer(rotated)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                response = await client.get("/api/v1/auth/me", headers=actor.headers)
        finally:
            server.stop()
        assert response.status_code == 200

    async def test_disabled_user_is_rejected(
        self,
        api: httpx.AsyncClient,
        anonymous_api: httpx.AsyncClient,
        admin: Actor,
        identities: IdentityFactory,
    ) -> None:
        tenant_id = admin.user.tenant_id
        created = await api.post("/api/v1/users", json={"username": f"gone-{uuid.uuid4().hex[:6]}"})
        assert created.status_code == 201
        user = created.json()
        token = (
            await login(
                anonymous_api,
                f"{await self._slug(api, tenant_id)}/{user['username']}",
                user["generated_password"],
            )
        ).json()["access_token"]
        assert (
            await anonymous_api.get("/api/v1/auth/me", headers=bearer(token))
        ).status_code == 200
        disabled = await api.patch(f"/api/v1/users/{user['id']}", json={"status": "disabled"})
        assert disabled.status_code == 200
        response = await anonymous_api.get("/api/v1/auth/me", headers=bearer(token))
        assert response.status_code == 401
        assert response.json()["detail"] == "user is disabled"

    @staticmethod
    async def _slug(api: httpx.AsyncClient, tenant_id: uuid.UUID) -> str:
        slug: str = (await api.get(f"/api/v1/tenants/{tenant_id}")).json()["slug"]
        return slug

    async def test_missing_token_is_401(self, anonymous_api: httpx.AsyncClient) -> None:
        response = await anonymous_api.get("/api/v1/projects")
        assert response.status_code == 401


class TestProjectsAndMembers:
    async def test_owner_adds_a_member_who_then_sees_the_project(
        self,
        api: httpx.AsyncClient,
        anonymous_api: httpx.AsyncClient,
        admin: Actor,
        identities: IdentityFactory,
    ) -> None:
        project = (await api.post("/api/v1/projects", json={"name": "vision"})).json()
        user = (await api.post("/api/v1/users", json={"username": "bob"})).json()
        added = await api.post(
            f"/api/v1/projects/{project['id']}/members",
            json={"user_id": user["id"], "role": "member"},
        )
        assert added.status_code == 201
        members = (await api.get(f"/api/v1/projects/{project['id']}/members")).json()
        assert {(m["username"], m["role"]) for m in members} == {
            (admin.user.username, "owner"),
            ("bob", "member"),
        }
        duplicate = await api.post("/api/v1/projects", json={"name": "vision"})
        assert duplicate.status_code == 409

    async def test_last_owner_cannot_leave(self, api: httpx.AsyncClient, admin: Actor) -> None:
        project = (await api.post("/api/v1/projects", json={"name": "solo"})).json()
        response = await api.delete(f"/api/v1/projects/{project['id']}/members/{admin.user.id}")
        assert response.status_code == 409


class TestApiKeys:
    async def test_key_is_shown_once_stored_hashed_and_works_within_its_scopes(
        self, api: httpx.AsyncClient, anonymous_api: httpx.AsyncClient, settings: Settings
    ) -> None:
        project = (await api.post("/api/v1/projects", json={"name": "keys"})).json()
        created = await api.post(
            f"/api/v1/projects/{project['id']}/api-keys",
            json={"name": "ci", "scopes": ["projects:read", "api_keys:read"], "rpm_limit": 60},
        )
        assert created.status_code == 201
        key = created.json()["key"]
        prefix = created.json()["prefix"]
        assert key.startswith(prefix + "_")
        listed = (await api.get(f"/api/v1/projects/{project['id']}/api-keys")).json()
        assert "key" not in listed["items"][0]

        conn = await asyncpg.connect(
            settings.database.url.get_secret_value().replace("+asyncpg", "")
        )
        try:
            stored = await conn.fetchrow("SELECT prefix, secret_hash FROM api_key")
        finally:
            await conn.close()
        assert stored["prefix"] == prefix
        assert key.split("_", 2)[2] not in stored["secret_hash"]

        as_key = bearer(key)
        assert (
            await anonymous_api.get(f"/api/v1/projects/{project['id']}", headers=as_key)
        ).status_code == 200
        # Outside its scopes: 403; outside its project: 404.
        write = await anonymous_api.patch(
            f"/api/v1/projects/{project['id']}", json={"description": "x"}, headers=as_key
        )
        assert write.status_code == 403
        other = (await api.post("/api/v1/projects", json={"name": "other"})).json()
        assert (
            await anonymous_api.get(f"/api/v1/projects/{other['id']}", headers=as_key)
        ).status_code == 404

    async def test_revoked_expired_and_deleted_project_keys_stop_working(
        self, api: httpx.AsyncClient, anonymous_api: httpx.AsyncClient
    ) -> None:
        project = (await api.post("/api/v1/projects", json={"name": "doomed"})).json()
        base = f"/api/v1/projects/{project['id']}/api-keys"
        revoked = (await api.post(base, json={"name": "a", "scopes": ["projects:read"]})).json()
        await api.post(f"{base}/{revoked['id']}/revoke")
        response = await anonymous_api.get("/api/v1/projects", headers=bearer(revoked["key"]))
        assert response.status_code == 401
        assert response.json()["detail"] == "API key revoked"

        past = await api.post(
            base,
            json={"name": "b", "scopes": ["projects:read"], "expires_at": "2001-01-01T00:00:00Z"},
        )
        assert past.status_code == 400

        live = (await api.post(base, json={"name": "c", "scopes": ["projects:read"]})).json()
        assert (
            await anonymous_api.get("/api/v1/projects", headers=bearer(live["key"]))
        ).status_code == 200
        assert (await api.delete(f"/api/v1/projects/{project['id']}")).status_code == 200
        gone = await anonymous_api.get("/api/v1/projects", headers=bearer(live["key"]))
        assert gone.status_code == 401

    async def test_a_member_cannot_grant_more_than_their_role(
        self,
        api: httpx.AsyncClient,
        anonymous_api: httpx.AsyncClient,
        identities: IdentityFactory,
        admin: Actor,
    ) -> None:
        project = (await api.post("/api/v1/projects", json={"name": "limits"})).json()
        from control_plane.identity.tables import Tenant

        tenant = Tenant(id=admin.user.tenant_id, slug="x", display_name="x")
        member = await identities.user(tenant)
        await api.post(
            f"/api/v1/projects/{project['id']}/members",
            json={"user_id": str(member.user.id), "role": "member"},
        )
        response = await anonymous_api.post(
            f"/api/v1/projects/{project['id']}/api-keys",
            json={"name": "too-strong", "scopes": ["projects:admin"]},
            headers=member.headers,
        )
        assert response.status_code == 403

    async def test_last_used_is_recorded_without_a_write_per_request(
        self, api: httpx.AsyncClient, anonymous_api: httpx.AsyncClient, settings: Settings
    ) -> None:
        from control_plane.core.db import create_engine, create_sessionmaker
        from control_plane.core.redis import create_redis
        from control_plane.identity.authn import flush_last_used

        project = (await api.post("/api/v1/projects", json={"name": "usage"})).json()
        key = (
            await api.post(
                f"/api/v1/projects/{project['id']}/api-keys",
                json={"name": "u", "scopes": ["projects:read"]},
            )
        ).json()
        for _ in range(3):
            await anonymous_api.get("/api/v1/projects", headers=bearer(key["key"]))
        before = (await api.get(f"/api/v1/projects/{project['id']}/api-keys/{key['id']}")).json()
        assert before["last_used_at"] is None

        engine = create_engine(settings.database)
        redis = create_redis(settings.redis)
        try:
            assert await flush_last_used(create_sessionmaker(engine), redis) >= 1
        finally:
            await redis.aclose()
            await engine.dispose()
        after = (await api.get(f"/api/v1/projects/{project['id']}/api-keys/{key['id']}")).json()
        assert after["last_used_at"] is not None


class TestAuditLog:
    async def test_changes_are_audited_and_tampering_is_detected(
        self, api: httpx.AsyncClient, settings: Settings
    ) -> None:
        project = (await api.post("/api/v1/projects", json={"name": "audited"})).json()
        await api.post(
            f"/api/v1/projects/{project['id']}/api-keys",
            json={"name": "k", "scopes": ["projects:read"]},
        )
        events = (await api.get("/api/v1/audit")).json()["items"]
        actions = [e["action"] for e in events]
        assert actions[:2] == ["api_key.create", "project.create"]

        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CP_")},
            "CP_DATABASE__URL": settings.database.url.get_secret_value(),
        }

        def verify() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "control_plane.cli", "audit", "verify"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        ok = await asyncio.to_thread(verify)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "audit chain intact" in ok.stdout

        conn = await asyncpg.connect(
            settings.database.url.get_secret_value().replace("+asyncpg", "")
        )
        try:
            await conn.execute(
                "UPDATE audit_event SET details = $1 WHERE action = 'api_key.create'",
                '{"scopes": ["*:admin"]}',
            )
        finally:
            await conn.close()
        broken = await asyncio.to_thread(verify)
        assert broken.returncode == 1
        assert "BROKEN" in broken.stdout

    async def test_audit_is_for_tenant_admins_only(
        self, anonymous_api: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        tenant = await identities.tenant()
        user = await identities.user(tenant)
        response = await anonymous_api.get("/api/v1/audit", headers=user.headers)
        assert response.status_code == 403


class TestListing:
    async def test_projects_paginate_and_sort(self, api: httpx.AsyncClient) -> None:
        for name in ("charlie", "alpha", "bravo"):
            assert (await api.post("/api/v1/projects", json={"name": name})).status_code == 201
        first = (await api.get("/api/v1/projects", params={"limit": 2})).json()
        assert [p["name"] for p in first["items"]] == ["alpha", "bravo"]
        assert first["total"] == 3
        second = (await api.get("/api/v1/projects", params={"limit": 2, "page": 2})).json()
        assert [p["name"] for p in second["items"]] == ["charlie"]
        newest = (
            await api.get("/api/v1/projects", params={"sort": "created_at", "order": "desc"})
        ).json()
        assert [p["name"] for p in newest["items"]] == ["bravo", "alpha", "charlie"]
        bad = await api.get("/api/v1/projects", params={"sort": "secret_column"})
        assert bad.status_code == 422


class TestInputTheDatabaseCannotHold:
    async def test_nul_character_in_a_filter_is_422(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/api/v1/audit", params={"action": "bad\x00value"})
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"


class TestNewcomerJourney:
    async def test_sign_in_then_project_member_key_credential_all_audited(
        self, anonymous_api: httpx.AsyncClient, identities: IdentityFactory
    ) -> None:
        tenant = await identities.tenant()
        admin = await identities.user(tenant, admin=True)
        token = (await login(anonymous_api, f"{tenant.slug}/{admin.user.username}")).json()
        headers = bearer(token["access_token"])

        project = await anonymous_api.post(
            "/api/v1/projects", json={"name": "first"}, headers=headers
        )
        assert project.status_code == 201
        project_id = project.json()["id"]
        user = await anonymous_api.post(
            "/api/v1/users", json={"username": "colleague"}, headers=headers
        )
        member = await anonymous_api.post(
            f"/api/v1/projects/{project_id}/members",
            json={"user_id": user.json()["id"], "role": "member"},
            headers=headers,
        )
        key = await anonymous_api.post(
            f"/api/v1/projects/{project_id}/api-keys",
            json={"name": "automation", "scopes": ["projects:read"]},
            headers=headers,
        )
        credential = await anonymous_api.post(
            f"/api/v1/projects/{project_id}/credentials",
            json={"name": "openai", "provider": "openai", "api_key": "sk-newcomer-secret-1234"},
            headers=headers,
        )
        assert [r.status_code for r in (user, member, key, credential)] == [201] * 4

        audit = (await anonymous_api.get("/api/v1/audit", headers=headers)).json()["items"]
        assert [e["action"] for e in audit][:6] == [
            "credential.create",
            "api_key.create",
            "member.add",
            "user.create",
            "project.create",
            "auth.login",
        ]
        assert all(e["actor_id"] == str(admin.user.id) for e in audit[:6])
