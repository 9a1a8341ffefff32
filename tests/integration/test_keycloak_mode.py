"""Keycloak mode (realm = tenant) against a real OpenID Provider.

The provider is `oidc-provider`, a certified OpenID Provider library, run on Node by
`tests/oidc/server.mjs` with Keycloak's layout: issuer `<base>/realms/<realm>`, keys at
`.../protocol/openid-connect/certs`, RS256 JWT access tokens with Keycloak's claims
(`preferred_username`, `realm_access`, `resource_access`, `azp`) from a password grant,
and key rotation that keeps the old key published. Every token a test accepts or
rejects for its claims is minted and signed there; only tokens no honest provider issues
(`alg: none`, HS256 keyed with the public key, a foreign key under the realm's kid) are
forged here. Tokens go through the real HTTP JWKS fetch and PyJWT verification, and
users land in the test's own PostgreSQL database.

Admin operations (`RealmAdmin`) run against a stand-in HTTP server that answers the
admin REST paths python-keycloak calls; there is no real Keycloak here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.config import KeycloakSettings, Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.core.errors import DependencyUnavailable, NotFound, Unauthenticated
from control_plane.core.redis import create_redis
from control_plane.devstack.services import free_port
from control_plane.identity import keycloak as keycloak_module
from control_plane.identity.authn import Authenticator
from control_plane.identity.keycloak import (
    KeycloakIdentityProvider,
    RealmAdmin,
    RealmKeyCache,
    external_identity_provider,
)
from control_plane.identity.permissions import Principal
from control_plane.identity.tables import Tenant, User, UserStatus
from tests.fixtures.oidc import OidcServer

CLIENT_SECRET = "control-plane-secret"


def keycloak_settings(base: Settings, url: str, public_url: str = "") -> Settings:
    return base.model_copy(
        update={
            "auth": base.auth.model_copy(update={"mode": "keycloak"}),
            "keycloak": KeycloakSettings(
                url=url, public_url=public_url, client_secret=SecretStr(CLIENT_SECRET)
            ),
        }
    )


@pytest.fixture
def settings(settings: Settings, oidc_server: OidcServer) -> Settings:
    """The test's settings in keycloak mode, pointed at the test OpenID Provider."""
    return keycloak_settings(settings, oidc_server.url)


@pytest_asyncio.fixture(loop_scope="session")
async def realm(oidc_server: OidcServer) -> str:
    return await oidc_server.create_realm()


@pytest_asyncio.fixture(loop_scope="session")
async def sessions(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings.database)
    yield create_sessionmaker(engine)
    await engine.dispose()


@dataclass
class Keycloak:
    """A provider whose JWKS fetches are counted, and authentication through it."""

    provider: KeycloakIdentityProvider
    authenticator: Authenticator
    sessions: async_sessionmaker[AsyncSession]
    jwks_fetches: list[str] = field(default_factory=list)

    async def authenticate(self, token: str) -> Principal:
        async with session_scope(self.sessions) as session:
            return await self.authenticator.authenticate(session, token)

    async def user(self, subject: str) -> User | None:
        async with self.sessions() as session:
            return (
                await session.exec(select(User).where(User.external_subject == subject))
            ).first()

    async def user_count(self) -> int:
        async with self.sessions() as session:
            return (await session.exec(select(func.count()).select_from(User))).one()


@asynccontextmanager
async def _build_keycloak(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Keycloak]:
    fetches: list[str] = []

    async def count(request: httpx.Request) -> None:
        if request.url.path.endswith("/protocol/openid-connect/certs"):
            fetches.append(str(request.url))

    redis = create_redis(settings.redis)
    async with httpx.AsyncClient(transport=transport, event_hooks={"request": [count]}) as http:
        provider = KeycloakIdentityProvider(settings, http)
        yield Keycloak(provider, Authenticator(settings, redis, provider), sessions, fetches)
    await redis.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def keycloak(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Keycloak]:
    async with _build_keycloak(settings, sessions) as built:
        yield built


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


class TestProvisioning:
    async def test_first_token_creates_the_tenant_and_the_user(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        alice = await oidc_server.create_user(
            realm, email="alice@example.com", name="Alice Liddell", realm_roles=["admin"]
        )
        token = await oidc_server.token(realm, alice)

        principal = await keycloak.authenticate(token)

        row = await keycloak.user(alice.sub)
        assert row is not None
        assert (row.username, row.email, row.display_name) == (
            alice.username,
            "alice@example.com",
            "Alice Liddell",
        )
        assert row.is_tenant_admin is True
        assert principal.user_id == row.id
        assert principal.is_tenant_admin is True
        async with keycloak.sessions() as session:
            tenant = await session.get(Tenant, row.tenant_id)
        assert tenant is not None
        assert tenant.slug == realm

    async def test_an_admin_role_of_our_client_also_makes_a_tenant_admin(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        bob = await oidc_server.create_user(realm, client_roles={"control-plane": ["admin"]})
        carol = await oidc_server.create_user(realm, client_roles={"other-app": ["admin"]})

        assert (await keycloak.authenticate(await oidc_server.token(realm, bob))).is_tenant_admin
        principal = await keycloak.authenticate(await oidc_server.token(realm, carol))
        assert principal.is_tenant_admin is False

    async def test_later_tokens_update_the_profile_and_the_admin_flag(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        dave = await oidc_server.create_user(realm, email="dave@old.example", realm_roles=["admin"])
        first = await keycloak.authenticate(await oidc_server.token(realm, dave))
        renamed = await oidc_server.create_user(
            realm, sub=dave.sub, username="david", email="david@new.example", realm_roles=[]
        )

        second = await keycloak.authenticate(await oidc_server.token(realm, renamed))

        row = await keycloak.user(dave.sub)
        assert row is not None
        assert second.user_id == first.user_id == row.id
        assert (row.username, row.email, row.is_tenant_admin) == (
            "david",
            "david@new.example",
            False,
        )
        assert second.is_tenant_admin is False

    async def test_a_name_held_by_another_account_is_not_taken_over(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        first = await oidc_server.create_user(realm, username="erin")
        await keycloak.authenticate(await oidc_server.token(realm, first))
        # Keycloak forgot erin; a new erin (new subject) must not inherit her account.
        second = await oidc_server.create_user(realm, username="erin")

        principal = await keycloak.authenticate(await oidc_server.token(realm, second))

        old, new = await keycloak.user(first.sub), await keycloak.user(second.sub)
        assert old is not None
        assert new is not None
        assert principal.user_id == new.id != old.id
        assert new.username.startswith("erin.")

    async def test_a_disabled_user_stays_disabled(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        frank = await oidc_server.create_user(realm)
        await keycloak.authenticate(await oidc_server.token(realm, frank))
        async with session_scope(keycloak.sessions) as session:
            row = (await session.exec(select(User).where(User.external_subject == frank.sub))).one()
            row.status = UserStatus.DISABLED.value
            session.add(row)

        with pytest.raises(Unauthenticated, match="disabled"):
            await keycloak.authenticate(await oidc_server.token(realm, frank))
        disabled = await keycloak.user(frank.sub)
        assert disabled is not None
        assert disabled.status == UserStatus.DISABLED.value

    async def test_a_token_for_our_audience_from_another_client_is_accepted(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        grace = await oidc_server.create_user(realm)
        token = await oidc_server.token(
            realm, grace, client_id="other-app", audience="control-plane"
        )

        principal = await keycloak.authenticate(token)

        assert principal.username == grace.username

    async def test_me_answers_for_a_keycloak_user(
        self, oidc_server: OidcServer, realm: str, api: httpx.AsyncClient
    ) -> None:
        heidi = await oidc_server.create_user(
            realm, email="heidi@example.com", realm_roles=["admin"]
        )
        token = await oidc_server.token(realm, heidi)

        me = await api.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        again = await api.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        refused = await api.get("/api/v1/auth/me", headers={"Authorization": "Bearer x.y.z"})

        assert me.status_code == 200, me.text
        body = me.json()
        assert (body["username"], body["email"], body["tenant_slug"]) == (
            heidi.username,
            "heidi@example.com",
            realm,
        )
        assert body["is_tenant_admin"] is True
        assert again.json()["id"] == body["id"]
        assert refused.status_code == 401


class TestRejectedTokens:
    async def _assert_refused(
        self, keycloak: Keycloak, token: str, reason: str, error: type[Exception] = Unauthenticated
    ) -> None:
        with pytest.raises(error, match=reason):
            await keycloak.authenticate(token)
        assert await keycloak.user_count() == 0

    async def test_expired(self, oidc_server: OidcServer, realm: str, keycloak: Keycloak) -> None:
        ivan = await oidc_server.create_user(realm)
        now = int(time.time())
        token = await oidc_server.token(realm, ivan, claims={"iat": now - 600, "exp": now - 60})

        await self._assert_refused(keycloak, token, "expired")

    async def test_without_an_expiry(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        judy = await oidc_server.create_user(realm)
        token = await oidc_server.token(realm, judy, claims={"exp": None})

        await self._assert_refused(keycloak, token, "invalid token")

    async def test_signed_by_another_key_under_the_realms_kid(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        real = await oidc_server.token(realm, await oidc_server.create_user(realm))
        kid = jwt.get_unverified_header(real)["kid"]
        payload = jwt.decode(real, options={"verify_signature": False})
        impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode(payload, impostor, algorithm="RS256", headers={"kid": kid})

        await self._assert_refused(keycloak, token, "invalid token")

    async def test_meant_for_another_service(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        mallory = await oidc_server.create_user(realm)
        token = await oidc_server.token(realm, mallory, client_id="other-app", audience="billing")

        await self._assert_refused(keycloak, token, "not meant for this service")

    async def test_from_another_host(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        niaj = await oidc_server.create_user(realm)
        token = await oidc_server.token(realm, niaj, host=f"localhost:{oidc_server.port}")
        assert jwt.decode(token, options={"verify_signature": False})["iss"].startswith(
            "http://localhost:"
        )

        await self._assert_refused(keycloak, token, "issuer is not a realm of our keycloak")

    async def test_with_an_issuer_outside_the_realm_layout(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        olivia = await oidc_server.create_user(realm)
        for issuer in (
            f"{oidc_server.url}/auth/realms/{realm}",
            f"{oidc_server.url}/realms/{realm}/../{realm}",
            f"{oidc_server.url}/realms/Not_A_Slug",
        ):
            token = await oidc_server.token(realm, olivia, claims={"iss": issuer})
            await self._assert_refused(keycloak, token, "issuer is not a realm")

    async def test_of_one_realm_claiming_another(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        other = await oidc_server.create_realm()
        peggy = await oidc_server.create_user(realm)
        token = await oidc_server.token(
            realm, peggy, claims={"iss": f"{oidc_server.url}/realms/{other}"}
        )

        # The other realm's keys do not include this realm's kid.
        await self._assert_refused(keycloak, token, "unknown signing key")

    async def test_of_a_realm_keycloak_does_not_know(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        rupert = await oidc_server.create_user(realm)
        token = await oidc_server.token(
            realm, rupert, claims={"iss": f"{oidc_server.url}/realms/nobody-onboarded-this"}
        )

        await self._assert_refused(keycloak, token, "unknown realm")

    async def test_of_the_admin_realm(
        self, oidc_server: OidcServer, settings: Settings, keycloak: Keycloak
    ) -> None:
        admin_realm = await oidc_server.create_realm(settings.keycloak.admin_realm)
        root = await oidc_server.create_user(admin_realm, realm_roles=["admin"])
        token = await oidc_server.token(admin_realm, root)

        await self._assert_refused(keycloak, token, "admin realm is not a tenant")

    async def test_an_id_token(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        sybil = await oidc_server.create_user(realm)
        token = await oidc_server.token(realm, sybil, claims={"typ": "ID"})

        await self._assert_refused(keycloak, token, "not an access token")

    async def test_alg_none(self, oidc_server: OidcServer, realm: str, keycloak: Keycloak) -> None:
        real = await oidc_server.token(realm, await oidc_server.create_user(realm))
        header = {"alg": "none", "kid": jwt.get_unverified_header(real)["kid"]}
        payload = jwt.decode(real, options={"verify_signature": False})

        await self._assert_refused(
            keycloak, _forged(header, payload, lambda _: b""), "algorithm is not allowed"
        )

    async def test_hs256_keyed_with_the_realms_public_key(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        real = await oidc_server.token(realm, await oidc_server.create_user(realm))
        kid = jwt.get_unverified_header(real)["kid"]
        [jwk] = [k for k in await oidc_server.jwks(realm) if k["kid"] == kid]
        public_pem = jwt.PyJWK(jwk).key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        payload = jwt.decode(real, options={"verify_signature": False})
        token = _forged(
            {"alg": "HS256", "typ": "JWT", "kid": kid},
            payload,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        )

        await self._assert_refused(keycloak, token, "algorithm is not allowed")

    async def test_garbage(self, keycloak: Keycloak) -> None:
        await self._assert_refused(keycloak, "not-a-jwt", "malformed token")


class TestKeyRotation:
    async def test_a_new_kid_makes_one_refetch_for_a_burst_of_tokens(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        users = [await oidc_server.create_user(realm) for _ in range(5)]
        old_token = await oidc_server.token(realm, users[0])
        await keycloak.authenticate(old_token)
        assert len(keycloak.jwks_fetches) == 1
        new_kid = await oidc_server.rotate_keys(realm)
        tokens = [await oidc_server.token(realm, user) for user in users]
        assert {jwt.get_unverified_header(t)["kid"] for t in tokens} == {new_kid}

        principals = await asyncio.gather(*(keycloak.authenticate(t) for t in tokens))

        assert len({p.user_id for p in principals}) == 5
        assert len(keycloak.jwks_fetches) == 2
        # The old key stays published (passive), so earlier tokens keep working.
        await keycloak.authenticate(old_token)
        assert len(keycloak.jwks_fetches) == 2
        assert keycloak.jwks_fetches[0].startswith(f"{oidc_server.url}/realms/{realm}/")

    async def test_made_up_kids_refetch_at_most_once_per_interval(
        self, oidc_server: OidcServer, realm: str, keycloak: Keycloak
    ) -> None:
        real = await oidc_server.token(realm, await oidc_server.create_user(realm))
        await keycloak.authenticate(real)
        header = jwt.get_unverified_header(real)
        payload = jwt.decode(real, options={"verify_signature": False})

        for attempt in range(5):
            token = _forged({**header, "kid": f"made-up-{attempt}"}, payload, lambda _: b"sig")
            with pytest.raises(Unauthenticated, match="unknown signing key"):
                await keycloak.authenticate(token)

        assert len(keycloak.jwks_fetches) == 2


class _Switch(httpx.AsyncBaseTransport):
    """The network between us and Keycloak, which a test can cut."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class TestKeycloakUnreachable:
    async def test_no_keys_at_all_is_a_dependency_failure(
        self,
        oidc_server: OidcServer,
        realm: str,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        # Issuers say the public URL; the internal URL leads nowhere.
        unreachable = keycloak_settings(
            settings, f"http://127.0.0.1:{free_port()}", public_url=oidc_server.url
        )
        token = await oidc_server.token(realm, await oidc_server.create_user(realm))

        async with _build_keycloak(unreachable, sessions) as keycloak:
            for _ in range(3):
                with pytest.raises(DependencyUnavailable) as raised:
                    await keycloak.authenticate(token)
                assert raised.value.dependency == "keycloak"
            # Failures are remembered for a while instead of retried on every request.
            assert len(keycloak.jwks_fetches) == 1

    async def test_cached_keys_outlive_an_outage(
        self,
        oidc_server: OidcServer,
        realm: str,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        network = _Switch()
        now = [0.0]
        token = await oidc_server.token(realm, await oidc_server.create_user(realm))
        async with _build_keycloak(settings, sessions, transport=network) as keycloak:
            keycloak.provider.keys = RealmKeyCache(
                settings.keycloak, keycloak.provider.http, clock=lambda: now[0]
            )
            await keycloak.authenticate(token)
            network.down = True
            now[0] += settings.keycloak.jwks_cache_seconds + 1

            await keycloak.authenticate(token)

            assert len(keycloak.jwks_fetches) == 2
            network.down = False
            now[0] += keycloak_module.REFETCH_INTERVAL_SECONDS
            await keycloak.authenticate(token)
            assert len(keycloak.jwks_fetches) == 3

    async def test_issuers_may_use_the_public_url(
        self,
        oidc_server: OidcServer,
        realm: str,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        public = f"http://localhost:{oidc_server.port}"
        split = keycloak_settings(settings, oidc_server.url, public_url=public)
        trent = await oidc_server.create_user(realm)
        token = await oidc_server.token(realm, trent, host=f"localhost:{oidc_server.port}")

        async with _build_keycloak(split, sessions) as keycloak:
            principal = await keycloak.authenticate(token)
            assert principal.username == trent.username
            # Keys come from the internal URL, whatever host the issuer names.
            assert keycloak.jwks_fetches == [
                f"{oidc_server.url}/realms/{realm}/protocol/openid-connect/certs"
            ]


class TestProviderFactory:
    def test_local_mode_has_no_external_provider(self, settings: Settings) -> None:
        local = settings.model_copy(
            update={"auth": settings.auth.model_copy(update={"mode": "local"})}
        )
        assert external_identity_provider(local) is None

    async def test_keycloak_mode_gets_a_provider_that_closes(self, settings: Settings) -> None:
        provider = external_identity_provider(settings)
        assert isinstance(provider, KeycloakIdentityProvider)
        await provider.aclose()
        assert provider.http.is_closed


# --- Admin operations, against a stand-in for Keycloak's admin REST API. ---


@dataclass
class AdminStandIn:
    url: str
    users: dict[str, dict[str, dict[str, Any]]]  # realm -> user id -> representation
    requests: list[tuple[str, str, Any]]


class _AdminHandler(BaseHTTPRequestHandler):
    stand_in: AdminStandIn
    admin_token = "stand-in-admin-token"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        raw = self._body()
        if self.command == "POST" and url.path == "/realms/master/protocol/openid-connect/token":
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            self.stand_in.requests.append((self.command, url.path, form))
            if form.get("client_secret") != CLIENT_SECRET:
                return self._reply(401, {"error": "unauthorized_client"})
            return self._reply(
                200, {"access_token": self.admin_token, "expires_in": 60, "token_type": "Bearer"}
            )
        body: dict[str, Any] = json.loads(raw) if raw else {}
        self.stand_in.requests.append((self.command, self.path, body))
        if self.headers.get("Authorization") != f"Bearer {self.admin_token}":
            return self._reply(401, {"error": "HTTP 401 Unauthorized"})
        if parts[:2] != ["admin", "realms"] or len(parts) < 4 or parts[3] != "users":
            return self._reply(404, {"error": "not found"})
        users = self.stand_in.users.get(parts[2])
        if users is None:
            return self._reply(404, {"error": "Realm not found."})
        if self.command == "POST" and len(parts) == 4:
            if any(u["username"] == body["username"] for u in users.values()):
                return self._reply(409, {"errorMessage": "User exists with same username"})
            user_id = str(uuid.uuid4())
            users[user_id] = {"id": user_id, **body}
            location = f"{self.stand_in.url}/admin/realms/{parts[2]}/users/{user_id}"
            return self._reply(201, headers={"Location": location})
        if self.command == "GET" and len(parts) == 4:
            wanted = parse_qs(url.query)["username"][0]
            return self._reply(200, [u for u in users.values() if u["username"] == wanted])
        if self.command == "PUT" and len(parts) == 6 and parts[5] == "reset-password":
            if parts[4] not in users:
                return self._reply(404, {"error": "User not found"})
            users[parts[4]]["credentials"] = [body]
            return self._reply(204)
        return self._reply(404, {"error": "not found"})

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def admin_stand_in() -> Iterator[AdminStandIn]:
    handler = type("Handler", (_AdminHandler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    stand_in = AdminStandIn(f"http://127.0.0.1:{server.server_port}", {"acme": {}}, [])
    handler.stand_in = stand_in  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture(loop_scope="session")
async def realm_admin(admin_stand_in: AdminStandIn) -> AsyncIterator[Callable[..., RealmAdmin]]:
    made: list[RealmAdmin] = []

    def make(url: str = admin_stand_in.url, secret: str = CLIENT_SECRET) -> RealmAdmin:
        admin = RealmAdmin(
            Settings(
                _env_file=None,
                environment="test",
                auth={"mode": "keycloak"},
                keycloak={"url": url, "client_secret": secret},
            )
        )
        made.append(admin)
        return admin

    yield make
    for admin in made:
        await admin.aclose()


class TestRealmAdmin:
    async def test_create_user_with_a_temporary_password(
        self, realm_admin: Callable[..., RealmAdmin], admin_stand_in: AdminStandIn
    ) -> None:
        user_id = await realm_admin().create_user(
            "acme", "walter", "walter@example.com", "first-password-123"
        )

        stored = admin_stand_in.users["acme"][user_id]
        assert (stored["username"], stored["email"], stored["enabled"]) == (
            "walter",
            "walter@example.com",
            True,
        )
        assert stored["credentials"] == [
            {"type": "password", "value": "first-password-123", "temporary": True}
        ]
        token_form = admin_stand_in.requests[0][2]
        assert (token_form["grant_type"], token_form["client_id"]) == (
            "client_credentials",
            "control-plane",
        )

    async def test_creating_an_existing_user_returns_its_id(
        self, realm_admin: Callable[..., RealmAdmin], admin_stand_in: AdminStandIn
    ) -> None:
        admin = realm_admin()
        first = await admin.create_user("acme", "xena", None, "first-password-123")

        again = await admin.create_user("acme", "xena", None, "first-password-123")

        assert again == first
        assert len(admin_stand_in.users["acme"]) == 1

    async def test_reset_password(
        self, realm_admin: Callable[..., RealmAdmin], admin_stand_in: AdminStandIn
    ) -> None:
        admin = realm_admin()
        user_id = await admin.create_user("acme", "yves", None, "first-password-123")

        await admin.reset_password("acme", user_id, "second-password-456", temporary=False)

        assert admin_stand_in.users["acme"][user_id]["credentials"] == [
            {"type": "password", "value": "second-password-456", "temporary": False}
        ]

    async def test_unknown_user_or_realm_is_not_found(
        self, realm_admin: Callable[..., RealmAdmin]
    ) -> None:
        admin = realm_admin()
        with pytest.raises(NotFound):
            await admin.reset_password("acme", str(uuid.uuid4()), "second-password-456")
        with pytest.raises(NotFound):
            await admin.create_user("nowhere", "zoe", None, "first-password-123")

    async def test_refused_credentials_or_no_keycloak_is_a_dependency_failure(
        self, realm_admin: Callable[..., RealmAdmin]
    ) -> None:
        with pytest.raises(DependencyUnavailable, match="admin credentials"):
            await realm_admin(secret="wrong").create_user("acme", "zoe", None, "pw-123456789")
        with pytest.raises(DependencyUnavailable, match="unreachable"):
            await realm_admin(url=f"http://127.0.0.1:{free_port()}").create_user(
                "acme", "zoe", None, "pw-123456789"
            )


class TestUserAdministrationInTheRealm:
    """Users created and reset through our API land in the realm (the admin REST stand-in
    above plays Keycloak's admin API) and link to it by `external_subject`."""

    async def test_created_user_lives_in_the_realm(
        self,
        realm_admin: Callable[..., RealmAdmin],
        admin_stand_in: AdminStandIn,
        settings: Settings,
    ) -> None:
        from control_plane.identity.schemas import UserCreate
        from control_plane.identity.service import UserService

        engine = create_engine(settings.database)
        async with session_scope(create_sessionmaker(engine)) as session:
            tenant = Tenant(slug="acme", display_name="Acme")
            session.add(tenant)
            await session.flush()
            admin = Principal(tenant_id=tenant.id, user_id=uuid.uuid4(), is_tenant_admin=True)
            service = UserService(session, realm_admin())
            created = await service.create(admin, UserCreate(username="quinn", email=None))
            password = await service.reset_password(admin, created.id)
            row = await session.get(User, created.id)
        await engine.dispose()

        assert row is not None
        assert row.password_hash is None
        in_realm = admin_stand_in.users["acme"][str(row.external_subject)]
        assert in_realm["username"] == "quinn"
        assert in_realm["credentials"] == [
            {"type": "password", "value": password, "temporary": True}
        ]
