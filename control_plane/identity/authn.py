"""Turns a bearer credential (our JWT, a Keycloak JWT, or an API key) into a Principal."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.config import Settings
from control_plane.core.db import session_scope, utcnow
from control_plane.core.errors import Unauthenticated
from control_plane.core.logging import get_logger
from control_plane.core.security import LocalTokens, constant_time_equal, sha256_hex
from control_plane.identity.permissions import Principal
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import ApiKey, ProjectStatus, TenantStatus, User, UserStatus

log = get_logger(__name__)

API_KEY_MARK = "cpk_"
API_KEY_PREFIX_CHARS = 12
# Hash of api key id -> last-used ISO time; flushed to PostgreSQL in batches.
LAST_USED_KEY = "cp:api_key:last_used"


def split_api_key(token: str) -> tuple[str, str]:
    """`cpk_<12 chars>_<secret>` -> (`cpk_<12 chars>`, secret)."""
    body = token[len(API_KEY_MARK) :]
    public, sep, secret = body.partition("_")
    if not sep or len(public) != API_KEY_PREFIX_CHARS or not secret:
        raise Unauthenticated("malformed API key")
    return API_KEY_MARK + public, secret


class ExternalIdentityProvider(Protocol):
    """Keycloak mode: validates a token and returns the (just-in-time provisioned) user."""

    async def resolve_user(self, session: AsyncSession, token: str) -> User: ...


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        external: ExternalIdentityProvider | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.local = LocalTokens(settings.auth)
        self.external = external

    async def authenticate(self, session: AsyncSession, token: str) -> Principal:
        if token.startswith(API_KEY_MARK):
            return await self._api_key(session, token)
        repo = IdentityRepository(session)
        if self.settings.auth.mode == "keycloak":
            if self.external is None:
                raise Unauthenticated("keycloak mode is not configured")
            user = await self.external.resolve_user(session, token)
        else:
            claims = self.local.verify(token)
            found = await repo.user(claims.subject)
            if found is None or found.tenant_id != claims.tenant_id:
                raise Unauthenticated("unknown user")
            user = found
        return await self.principal_for(session, user)

    async def principal_for(self, session: AsyncSession, user: User) -> Principal:
        repo = IdentityRepository(session)
        if user.status != UserStatus.ACTIVE.value:
            raise Unauthenticated("user is disabled")
        tenant = await repo.tenant(user.tenant_id)
        if tenant is None or tenant.status != TenantStatus.ACTIVE.value:
            raise Unauthenticated("tenant is disabled")
        return Principal(
            tenant_id=user.tenant_id,
            user_id=user.id,
            is_tenant_admin=user.is_tenant_admin,
            roles=await repo.roles_of(user.id),
            username=user.username,
        )

    async def _api_key(self, session: AsyncSession, token: str) -> Principal:
        prefix, secret = split_api_key(token)
        repo = IdentityRepository(session)
        key = await repo.api_key_by_prefix(prefix)
        if key is None or not constant_time_equal(key.secret_hash, sha256_hex(secret)):
            raise Unauthenticated("invalid API key")
        now = utcnow()
        if key.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated("API key expired")
        project = await repo.project(key.project_id)
        tenant = await repo.tenant(key.tenant_id)
        if project is None or project.status != ProjectStatus.ACTIVE.value:
            raise Unauthenticated("the API key's project no longer exists")
        if tenant is None or tenant.status != TenantStatus.ACTIVE.value:
            raise Unauthenticated("tenant is disabled")
        await self._touch(key.id, now)
        return Principal(
            tenant_id=key.tenant_id,
            api_key_id=key.id,
            key_project_id=key.project_id,
            key_scopes=frozenset(key.scopes),
        )

    async def _touch(self, key_id: uuid.UUID, now: datetime) -> None:
        try:
            await self.redis.hset(LAST_USED_KEY, str(key_id), now.isoformat())
        except Exception as err:  # last-used is best effort; never fail a request on it
            log.warning("identity.api_key.last_used_failed", error=str(err))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def parse_last_used(raw: bytes | str) -> datetime:
    value = _text(raw)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def flush_last_used(sessions: async_sessionmaker[AsyncSession], redis: Redis) -> int:
    """Move last-used times from Redis into PostgreSQL in one batch; returns keys updated."""
    batch = f"{LAST_USED_KEY}:flushing"
    try:
        await redis.rename(LAST_USED_KEY, batch)
    except ResponseError:  # nothing recorded since the last flush
        return 0
    entries = await redis.hgetall(batch)
    async with session_scope(sessions) as session:
        for raw_id, raw_time in entries.items():
            await session.exec(
                update(ApiKey)
                .where(col(ApiKey.id) == uuid.UUID(_text(raw_id)))
                .values(last_used_at=parse_last_used(raw_time))
            )
    await redis.delete(batch)
    return len(entries)
