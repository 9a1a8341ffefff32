"""Keycloak mode (`CP_AUTH__MODE=keycloak`): realm = tenant.

Tokens are Keycloak access tokens, verified against their realm's published keys (JWKS).
The realm is read from the token's issuer, which must be `<keycloak url>/realms/<realm>`
or `<keycloak public_url>/realms/<realm>`; anything else is refused before a key is
looked up, so a token can only ever make us fetch keys from our own Keycloak.

What a token must satisfy:
* signature by a key of its realm's JWKS, algorithm RS256, ES256 or PS256 only (never
  `none`, never HMAC: an HS256 token "signed" with a public key is refused up front);
* `exp`, `iat`, `iss` and `sub` present, not expired (10 s of clock skew allowed);
* meant for us: `aud` contains `keycloak.audience`, or `azp` is `keycloak.client_id`.
  Keycloak puts `account` in `aud` by default, so a token our own client obtained is
  recognised by `azp`; tokens other clients obtain need an audience mapper that adds
  `keycloak.audience`;
* an access token: Keycloak marks ID and refresh tokens with `typ` `ID` / `Refresh`;
  those are refused, a `typ` of `Bearer` (or none) is accepted.

Roles: `admin` as a realm role (`realm_access.roles`) or as a role of our client
(`resource_access.<client_id>.roles`) makes the user a tenant admin; the flag follows the
token, so removing the role in Keycloak takes effect with the user's next token.

Provisioning is just-in-time: the first token of a realm creates its tenant (active,
named after the realm), the first token of a user creates the user (looked up afterwards
by tenant and `sub`). Later tokens update username, email, display name and the admin
flag when they changed. Status is ours: a user disabled here stays disabled whatever
Keycloak says. Keycloak's admin realm (`keycloak.admin_realm`) is never a tenant.

A Keycloak we cannot reach (or that answers garbage) is a dependency problem, not the
caller's: `DependencyUnavailable(dependency="keycloak")`, a 503. A realm Keycloak does
not know (404 on its keys) is `Unauthenticated`. Keys are cached per realm for
`keycloak.jwks_cache_seconds`; an unknown `kid` (key rotation) refetches at once, but at
most once per realm every `REFETCH_INTERVAL_SECONDS`, so tokens with made-up key ids
cannot make us hammer Keycloak. When a cache refresh fails, the keys we had keep
working until Keycloak answers again.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import jwt
from keycloak import KeycloakAdmin
from keycloak.exceptions import KeycloakConnectionError, KeycloakError
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.config import KeycloakSettings, Settings
from control_plane.core.errors import (
    BadRequest,
    ControlPlaneError,
    DependencyUnavailable,
    NotFound,
    Unauthenticated,
)
from control_plane.core.logging import get_logger
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import Tenant, TenantStatus, User

log = get_logger(__name__)

DEPENDENCY = "keycloak"
ADMIN_ROLE = "admin"
# Key type each accepted algorithm needs; nothing else is ever verified.
ALGORITHM_KEY_TYPES = {"RS256": "RSA", "PS256": "RSA", "ES256": "EC"}
REQUIRED_CLAIMS = ["exp", "iat", "iss", "sub"]
CLOCK_SKEW_SECONDS = 10
# Unknown-kid refetches and retries after a failed fetch, per realm.
REFETCH_INTERVAL_SECONDS = 10.0
JWKS_TIMEOUT_SECONDS = 5.0
ADMIN_TIMEOUT_SECONDS = 10
# Realm names come from unauthenticated tokens; bound what they can make us remember.
MAX_CACHED_REALMS = 1024
# Realm names become tenant slugs, so they follow the slug rule.
_REALM_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _base(url: str) -> str:
    return url.rstrip("/")


def _valid_realm(realm: str) -> bool:
    return bool(_REALM_NAME.match(realm))


@dataclass(frozen=True)
class _Failure:
    """Why the last key fetch failed; raised afresh each time (no growing tracebacks)."""

    kind: Literal["unavailable", "unknown_realm"]
    detail: str

    def error(self) -> ControlPlaneError:
        if self.kind == "unknown_realm":
            return Unauthenticated("unknown realm")
        return DependencyUnavailable(self.detail, dependency=DEPENDENCY)


@dataclass
class _RealmKeys:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    jwks: dict[str, dict[str, Any]] | None = None  # kid -> JWK
    parsed: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = -math.inf
    refetched_at: float = -math.inf
    failed_at: float = -math.inf
    failure: _Failure | None = None


class RealmKeyCache:
    """Signing keys of each realm, fetched from Keycloak's internal URL."""

    def __init__(
        self,
        settings: KeycloakSettings,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = _base(settings.url)
        self.ttl = float(settings.jwks_cache_seconds)
        self.http = http
        self.clock = clock
        self._realms: OrderedDict[str, _RealmKeys] = OrderedDict()

    def _entry(self, realm: str) -> _RealmKeys:
        entry = self._realms.get(realm)
        if entry is None:
            entry = self._realms[realm] = _RealmKeys()
            if len(self._realms) > MAX_CACHED_REALMS:
                self._realms.popitem(last=False)
        else:
            self._realms.move_to_end(realm)
        return entry

    async def key(self, realm: str, kid: str, algorithm: str) -> jwt.PyJWK:
        entry = self._entry(realm)
        fresh = entry.jwks is not None and self.clock() - entry.fetched_at < self.ttl
        jwk = entry.jwks.get(kid) if fresh and entry.jwks is not None else None
        if jwk is None:
            # One fetch per realm at a time: a burst of tokens with a new kid waits for
            # the first fetch and then finds the key.
            async with entry.lock:
                jwk = await self._locked_lookup(realm, entry, kid)
        return self._parsed(entry, kid, jwk, algorithm)

    async def _locked_lookup(self, realm: str, entry: _RealmKeys, kid: str) -> dict[str, Any]:
        now = self.clock()
        failure: _Failure | None = None
        if entry.jwks is None or now - entry.fetched_at >= self.ttl:
            failure = await self._refresh(realm, entry, now)
        elif kid not in entry.jwks and now - entry.refetched_at >= REFETCH_INTERVAL_SECONDS:
            entry.refetched_at = now
            log.info("identity.keycloak.unknown_kid_refetch", realm=realm, kid=kid)
            failure = await self._refresh(realm, entry, now)
        jwk = entry.jwks.get(kid) if entry.jwks is not None else None
        if jwk is None:
            raise failure.error() if failure else Unauthenticated("unknown signing key")
        return jwk

    async def _refresh(self, realm: str, entry: _RealmKeys, now: float) -> _Failure | None:
        if entry.failure is not None and now - entry.failed_at < REFETCH_INTERVAL_SECONDS:
            return entry.failure
        try:
            entry.jwks = await self._fetch(realm)
        except _FetchFailed as failed:
            entry.failure, entry.failed_at = failed.failure, now
            if failed.failure.kind == "unknown_realm":
                entry.jwks = None
            elif entry.jwks is not None:
                log.warning(
                    "identity.keycloak.jwks_stale", realm=realm, error=failed.failure.detail
                )
            return failed.failure
        entry.parsed.clear()
        entry.fetched_at, entry.failure = now, None
        return None

    async def _fetch(self, realm: str) -> dict[str, dict[str, Any]]:
        url = f"{self.base}/realms/{realm}/protocol/openid-connect/certs"
        try:
            response = await self.http.get(url, timeout=JWKS_TIMEOUT_SECONDS)
        except httpx.HTTPError as err:
            log.warning("identity.keycloak.jwks_unreachable", realm=realm, error=repr(err))
            raise _FetchFailed("unavailable", "keycloak is unreachable") from err
        if response.status_code == httpx.codes.NOT_FOUND:
            raise _FetchFailed("unknown_realm", f"keycloak has no realm {realm}")
        if response.status_code != httpx.codes.OK:
            log.warning("identity.keycloak.jwks_failed", realm=realm, status=response.status_code)
            raise _FetchFailed("unavailable", f"keycloak answered {response.status_code}")
        try:
            keys = response.json()["keys"]
            if not isinstance(keys, list):
                raise TypeError("keys is not a list")
        except (ValueError, KeyError, TypeError) as err:
            raise _FetchFailed("unavailable", "keycloak sent a malformed key set") from err
        return {
            key["kid"]: key
            for key in keys
            if isinstance(key, dict)
            and isinstance(key.get("kid"), str)
            and key.get("use", "sig") == "sig"
            and key.get("kty") in ALGORITHM_KEY_TYPES.values()
        }

    @staticmethod
    def _parsed(entry: _RealmKeys, kid: str, jwk: dict[str, Any], algorithm: str) -> jwt.PyJWK:
        """The key bound to the token's algorithm, if the key may be used with it."""
        if jwk.get("alg", algorithm) != algorithm or jwk["kty"] != ALGORITHM_KEY_TYPES[algorithm]:
            raise Unauthenticated("token algorithm does not match its key")
        if algorithm == "ES256" and jwk.get("crv") != "P-256":
            raise Unauthenticated("token algorithm does not match its key")
        parsed = entry.parsed.get((kid, algorithm))
        if parsed is None:
            try:
                parsed = jwt.PyJWK(jwk, algorithm=algorithm)
            except jwt.PyJWTError as err:
                raise Unauthenticated("unusable signing key") from err
            entry.parsed[(kid, algorithm)] = parsed
        return parsed


class _FetchFailed(Exception):
    def __init__(self, kind: Literal["unavailable", "unknown_realm"], detail: str) -> None:
        super().__init__(detail)
        self.failure = _Failure(kind, detail)


@dataclass(frozen=True)
class VerifiedToken:
    realm: str
    subject: str
    username: str
    email: str | None
    display_name: str | None
    is_admin: bool


def _roles(container: Any, *path: str) -> set[str]:
    for name in path:
        container = container.get(name) if isinstance(container, dict) else None
    if not isinstance(container, list):
        return set()
    return {role for role in container if isinstance(role, str)}


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


class KeycloakIdentityProvider:
    """Verifies Keycloak access tokens and provisions their tenant and user on first sight.

    `http` is used for JWKS fetches; without one the provider makes (and `aclose()`
    closes) its own client.
    """

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        keycloak = settings.keycloak
        if not keycloak.url:
            raise ValueError("CP_KEYCLOAK__URL is required in keycloak mode")
        self.settings = keycloak
        self._own_http = http is None
        self.http = http or httpx.AsyncClient()
        self.keys = RealmKeyCache(keycloak, self.http)
        self._issuer_bases = {_base(u) for u in (keycloak.url, keycloak.public_url) if u}

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    def realm_of(self, issuer: object) -> str:
        if isinstance(issuer, str):
            for base in self._issuer_bases:
                prefix = f"{base}/realms/"
                if issuer.startswith(prefix):
                    realm = issuer[len(prefix) :]
                    if not _valid_realm(realm):
                        continue
                    if realm == self.settings.admin_realm:
                        raise Unauthenticated("the keycloak admin realm is not a tenant")
                    return realm
        raise Unauthenticated("token issuer is not a realm of our keycloak")

    async def verify(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            raise Unauthenticated("malformed token") from err
        algorithm = header.get("alg")
        if algorithm not in ALGORITHM_KEY_TYPES:
            raise Unauthenticated("token algorithm is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token names no signing key")
        issuer = unverified.get("iss")
        realm = self.realm_of(issuer)
        key = await self.keys.key(realm, kid, algorithm)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": REQUIRED_CLAIMS, "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as err:
            raise Unauthenticated("token expired") from err
        except jwt.PyJWTError as err:
            raise Unauthenticated("invalid token") from err
        return self._checked(realm, claims)

    def _checked(self, realm: str, claims: dict[str, Any]) -> VerifiedToken:
        token_type = claims.get("typ", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise Unauthenticated("not an access token")
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if not (
            (isinstance(audiences, list) and self.settings.audience in audiences)
            or claims.get("azp") == self.settings.client_id
        ):
            raise Unauthenticated("token is not meant for this service")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise Unauthenticated("token subject is invalid")
        name = _text(claims.get("name"), 255)
        if name is None:
            given = " ".join(
                part for part in (claims.get("given_name"), claims.get("family_name")) if part
            )
            name = _text(given, 255)
        roles = _roles(claims, "realm_access", "roles") | _roles(
            claims, "resource_access", self.settings.client_id, "roles"
        )
        return VerifiedToken(
            realm=realm,
            subject=subject,
            username=_text(claims.get("preferred_username"), 255) or subject,
            email=_text(claims.get("email"), 320),
            display_name=name,
            is_admin=ADMIN_ROLE in roles,
        )

    async def resolve_user(self, session: AsyncSession, token: str) -> User:
        verified = await self.verify(token)
        repo = IdentityRepository(session)
        tenant = await self._tenant(session, repo, verified.realm)
        if tenant.status != TenantStatus.ACTIVE.value:
            raise Unauthenticated("tenant is disabled")
        user = await repo.user_by_subject(tenant.id, verified.subject)
        if user is None:
            return await self._create_user(session, repo, tenant, verified)
        await self._update_user(session, repo, user, verified)
        return user

    async def _tenant(self, session: AsyncSession, repo: IdentityRepository, realm: str) -> Tenant:
        tenant = await repo.tenant_by_slug(realm)
        if tenant is not None:
            return tenant
        tenant = Tenant(slug=realm, display_name=realm)
        try:
            async with session.begin_nested():
                session.add(tenant)
                await session.flush()
        except IntegrityError:
            # Another request saw the realm first.
            existing = await repo.tenant_by_slug(realm)
            if existing is None:
                raise
            return existing
        log.info("identity.keycloak.tenant_provisioned", realm=realm, tenant_id=str(tenant.id))
        return tenant

    async def _create_user(
        self,
        session: AsyncSession,
        repo: IdentityRepository,
        tenant: Tenant,
        verified: VerifiedToken,
    ) -> User:
        username = await self._free_username(repo, tenant, verified)
        user = User(
            tenant_id=tenant.id,
            username=username,
            email=verified.email,
            display_name=verified.display_name,
            external_subject=verified.subject,
            is_tenant_admin=verified.is_admin,
        )
        try:
            async with session.begin_nested():
                session.add(user)
                await session.flush()
        except IntegrityError:
            # A concurrent first request of the same user created the row.
            existing = await repo.user_by_subject(tenant.id, verified.subject)
            if existing is None:
                raise
            return existing
        log.info(
            "identity.keycloak.user_provisioned",
            tenant_id=str(tenant.id),
            user_id=str(user.id),
            admin=user.is_tenant_admin,
        )
        return user

    @staticmethod
    async def _free_username(
        repo: IdentityRepository, tenant: Tenant, verified: VerifiedToken
    ) -> str:
        """The token's username, unless another row holds it (a user deleted and
        re-created in Keycloak, or a local account): identities are never merged, so the
        newcomer gets the name with a piece of its subject appended."""
        if await repo.user_by_username(tenant.id, verified.username) is None:
            return verified.username
        return f"{verified.username[:230]}.{verified.subject[:24]}"

    async def _update_user(
        self,
        session: AsyncSession,
        repo: IdentityRepository,
        user: User,
        verified: VerifiedToken,
    ) -> None:
        changed = False
        if user.username != verified.username:
            holder = await repo.user_by_username(user.tenant_id, verified.username)
            if holder is None:
                user.username, changed = verified.username, True
            else:
                log.warning("identity.keycloak.username_taken", user_id=str(user.id))
        # Absent claims (a token without the email or profile scope) keep what we know.
        if verified.email is not None and user.email != verified.email:
            user.email, changed = verified.email, True
        if verified.display_name is not None and user.display_name != verified.display_name:
            user.display_name, changed = verified.display_name, True
        if user.is_tenant_admin != verified.is_admin:
            log.info(
                "identity.keycloak.admin_changed", user_id=str(user.id), admin=verified.is_admin
            )
            user.is_tenant_admin, changed = verified.is_admin, True
        if changed:
            session.add(user)
            await session.flush()


def external_identity_provider(settings: Settings) -> KeycloakIdentityProvider | None:
    """The provider for keycloak mode (close it with `aclose()`); None in local mode."""
    if settings.auth.mode != "keycloak":
        return None
    return KeycloakIdentityProvider(settings)


class RealmAdmin:
    """User administration in a realm through Keycloak's admin REST API (python-keycloak).

    Signs in with client credentials (`keycloak.client_id` / `client_secret`) against
    `keycloak.admin_realm`; that client's service account needs `manage-users` in each
    realm it administers. Uses python-keycloak's async methods (`a_*`), falling back to
    the blocking ones in a thread on versions without them.

    Tested against a stand-in HTTP server that answers the admin REST paths python-keycloak
    calls (token endpoint, `POST /admin/realms/{realm}/users`, the username lookup and
    `PUT .../users/{id}/reset-password`), not against a real Keycloak.
    """

    def __init__(self, settings: Settings) -> None:
        keycloak = settings.keycloak
        if not keycloak.url:
            raise ValueError("CP_KEYCLOAK__URL is required for Keycloak administration")
        self.settings = keycloak
        # python-keycloak keeps the target realm on the connection, so each realm gets
        # its own admin client instead of switching one client back and forth.
        self._admins: dict[str, KeycloakAdmin] = {}

    def _admin(self, realm: str) -> KeycloakAdmin:
        if not _valid_realm(realm):
            raise BadRequest(f"{realm!r} is not a valid realm name")
        admin = self._admins.get(realm)
        if admin is None:
            admin = KeycloakAdmin(
                # A trailing slash keeps a path prefix (`/auth`) when python-keycloak joins.
                server_url=_base(self.settings.url) + "/",
                realm_name=realm,
                user_realm_name=self.settings.admin_realm,
                client_id=self.settings.client_id,
                client_secret_key=self.settings.client_secret.get_secret_value(),
                grant_type="client_credentials",
                timeout=ADMIN_TIMEOUT_SECONDS,
            )
            self._admins[realm] = admin
        return admin

    @staticmethod
    async def _call(admin: KeycloakAdmin, method: str, *args: Any, **kwargs: Any) -> Any:
        async_method = getattr(admin, f"a_{method}", None)
        if async_method is not None:
            return await async_method(*args, **kwargs)
        return await asyncio.to_thread(getattr(admin, method), *args, **kwargs)

    async def create_user(
        self, realm: str, username: str, email: str | None, temporary_password: str
    ) -> str:
        """Create an enabled user who must change the password at first sign-in; returns
        Keycloak's user id. A user of that name already there counts as created (so a
        retry after a lost answer succeeds) and keeps its password."""
        admin = self._admin(realm)
        payload = {
            "username": username,
            "email": email,
            "enabled": True,
            "credentials": [{"type": "password", "value": temporary_password, "temporary": True}],
        }
        try:
            return str(await self._call(admin, "create_user", payload))
        except KeycloakError as err:
            if err.response_code != httpx.codes.CONFLICT:
                raise _admin_error(err, realm) from err
        try:
            existing = await self._call(admin, "get_user_id", username)
        except KeycloakError as err:
            raise _admin_error(err, realm) from err
        if existing is None:
            raise DependencyUnavailable(
                "keycloak reported a conflict but has no such user", dependency=DEPENDENCY
            )
        return str(existing)

    async def reset_password(
        self, realm: str, user_id: str, password: str, temporary: bool = True
    ) -> None:
        admin = self._admin(realm)
        try:
            await self._call(admin, "set_user_password", user_id, password, temporary)
        except KeycloakError as err:
            raise _admin_error(err, realm) from err

    async def aclose(self) -> None:
        admins, self._admins = list(self._admins.values()), {}
        for admin in admins:
            await admin.connection.aclose()
            await admin.connection.keycloak_openid.connection.aclose()


def _reason(err: KeycloakError) -> str:
    body = err.response_body or b""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("error_description", "errorMessage", "error"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])[:200]
    return body.decode("utf-8", "replace")[:200] or "no reason given"


def _admin_error(err: KeycloakError, realm: str) -> ControlPlaneError:
    code = err.response_code
    log.warning(
        "identity.keycloak.admin_failed", realm=realm, status=code, error=type(err).__name__
    )
    if isinstance(err, KeycloakConnectionError) or code is None:
        return DependencyUnavailable("keycloak is unreachable", dependency=DEPENDENCY)
    if code == httpx.codes.NOT_FOUND:
        return NotFound("no such realm or user in keycloak")
    if code == httpx.codes.BAD_REQUEST:
        # Keycloak's reason (e.g. a password policy) helps the caller and holds no secret.
        return BadRequest(f"keycloak refused the request: {_reason(err)}")
    if code in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        return DependencyUnavailable(
            "keycloak refused the control plane's admin credentials", dependency=DEPENDENCY
        )
    return DependencyUnavailable(f"keycloak answered {code}", dependency=DEPENDENCY)
