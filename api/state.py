"""Clients the API builds once in its lifespan and shares across requests."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from control_plane.core.config import Settings
from control_plane.core.storage import ObjectStore
from control_plane.credentials.crypto import Vault
from control_plane.identity.authn import Authenticator
from control_plane.identity.keycloak import RealmAdmin


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    objects: ObjectStore
    temporal: Client
    auth: Authenticator
    vault: Vault
    # Keycloak mode: user administration in the realms.
    realm_admin: RealmAdmin | None = None
