"""Routing-table change notices: the control plane publishes, gateways listen.

Gateways keep their routing tables (API keys, endpoints and their ready replicas,
routers) in process and reload an entry when a notice names it, so the hot path never
reads the database. A notice is a hint, not the data: it says *what* changed (kind and
id), the gateway reads the new state itself. Publishing is best effort — a gateway also
reloads everything periodically, so a notice lost to a Redis outage delays a change,
it never loses it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import StrEnum

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.db import after_commit
from control_plane.core.logging import get_logger

log = get_logger(__name__)

CHANNEL = "cp:routing:changes"


class ChangeKind(StrEnum):
    ENDPOINT = "endpoint"
    ROUTER = "router"
    API_KEY = "api_key"
    MODEL = "model"
    PROJECT = "project"


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    id: str

    def encode(self) -> bytes:
        return json.dumps({"kind": self.kind.value, "id": self.id}).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Change | None:
        """The notice, or None for a message that is not one (never raises)."""
        try:
            body = json.loads(raw)
            return cls(ChangeKind(body["kind"]), str(body["id"]))
        except (ValueError, KeyError, TypeError):
            return None


async def publish_change(redis: Redis, kind: ChangeKind, id: uuid.UUID | str) -> bool:
    """Tell gateways that `kind` `id` changed; False (logged) when Redis did not take it."""
    try:
        await redis.publish(CHANNEL, Change(kind, str(id)).encode())
    except (RedisError, OSError) as err:
        log.warning("routing.change.not_published", kind=kind.value, id=str(id), error=str(err))
        return False
    return True


def announce_after_commit(
    session: AsyncSession, redis: Redis, kind: ChangeKind, id: uuid.UUID | str
) -> None:
    """Publish the notice once the session's unit of work has committed: a gateway that
    reloads on it must find the new state."""

    async def publish(_: AsyncSession) -> None:
        await publish_change(redis, kind, id)

    after_commit(session, publish)
