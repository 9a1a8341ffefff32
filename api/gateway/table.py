"""The gateway's routing table: what a request is checked and routed against, in memory.

Built from PostgreSQL at start, then kept current entry by entry when the control plane
publishes a change notice (`control_plane.routing.changes`) and reloaded whole every
`reload_seconds` besides, so a lost notice delays a change instead of losing it. The
request path only reads these dictionaries: no database call, no Redis call for routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.db import session_scope
from control_plane.core.logging import get_logger
from control_plane.credentials.crypto import Vault
from control_plane.credentials.service import reveal
from control_plane.endpoints.tables import Endpoint, EndpointReplica
from control_plane.identity.tables import ApiKey, Project, ProjectStatus, Tenant, TenantStatus
from control_plane.models.tables import Model
from control_plane.routing.changes import CHANNEL, Change, ChangeKind
from control_plane.routing.cooldown import CooldownPolicy, Cooldowns
from control_plane.routing.strategies import DEFAULT_STRATEGY, STRATEGIES, Strategy, TargetStats
from control_plane.routing.tables import Router
from workflows.contracts.endpoints import EndpointStatus, ReplicaState
from workflows.contracts.models import ModelStatus, SourceKind

log = get_logger(__name__)

# Endpoints the gateway knows: anything that may serve or be woken.
ROUTABLE = (EndpointStatus.RUNNING, EndpointStatus.DEGRADED, EndpointStatus.IDLE)
OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass(slots=True)
class KeyEntry:
    id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    secret_hash: str
    scopes: frozenset[str]
    allowed_models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    # Unix time; None: never.
    expires_at: float | None


@dataclass(slots=True)
class ReplicaEntry:
    name: str
    url: str
    # Requests this gateway process has in flight on the replica.
    in_flight: int = 0


@dataclass(slots=True)
class EndpointEntry:
    id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    status: str
    replicas: list[ReplicaEntry]
    # Requests in flight on the endpoint: from this process, and from the other gateway
    # processes as they last shared them (`api.gateway.inflight`).
    in_flight: int = 0
    remote_in_flight: int = 0
    # A cloud model a router targets: one "replica", the provider's API (its base URL,
    # which ends before the OpenAI paths' `/v1`), the provider's model id, and the
    # headers carrying the credential. Not addressable by name: only through routers.
    cloud: bool = False
    upstream_model: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def pick_replica(self) -> ReplicaEntry | None:
        """The ready replica with the fewest requests in flight from this gateway."""
        best: ReplicaEntry | None = None
        for replica in self.replicas:
            if best is None or replica.in_flight < best.in_flight:
                best = replica
        return best


@dataclass(slots=True)
class TargetEntry:
    """One target of a router: an endpoint with a weight and its own limits."""

    key: str
    endpoint_id: uuid.UUID
    rpm: int | None
    tpm: int | None
    stats: TargetStats


@dataclass(slots=True)
class RouterEntry:
    id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    strategy: Strategy
    targets: list[TargetEntry]
    # ("router" | "endpoint", id) in order.
    fallbacks: list[tuple[str, uuid.UUID]]
    retries: int
    retry_backoff_s: float
    timeout_s: float
    cooldowns: Cooldowns


@dataclass(slots=True)
class RoutingTable:
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    endpoints: dict[uuid.UUID, EndpointEntry] = field(default_factory=dict)
    routers: dict[uuid.UUID, RouterEntry] = field(default_factory=dict)
    loaded: bool = False
    # Set and replaced on every change: waiters (a wake) re-check what they wait for.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def resolve(self, project_id: uuid.UUID, name: str) -> RouterEntry | EndpointEntry | None:
        """A router or an endpoint of the project by name (they share one namespace)."""
        for router in self.routers.values():
            if router.name == name and router.project_id == project_id:
                return router
        for endpoint in self.endpoints.values():
            if endpoint.name == name and endpoint.project_id == project_id and not endpoint.cloud:
                return endpoint
        return None

    def names_of(self, project_id: uuid.UUID) -> list[str]:
        routers = [r.name for r in self.routers.values() if r.project_id == project_id]
        endpoints = [
            e.name for e in self.endpoints.values() if e.project_id == project_id and not e.cloud
        ]
        return sorted({*routers, *endpoints})

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def key_entry(key: ApiKey) -> KeyEntry:
    return KeyEntry(
        id=key.id,
        tenant_id=key.tenant_id,
        project_id=key.project_id,
        secret_hash=key.secret_hash,
        scopes=frozenset(key.scopes),
        allowed_models=frozenset(key.allowed_models) if key.allowed_models is not None else None,
        rpm=key.rpm_limit,
        tpm=key.tpm_limit,
        expires_at=_timestamp(key.expires_at),
    )


def endpoint_entry(row: Endpoint, replicas: Iterable[EndpointReplica]) -> EndpointEntry:
    return EndpointEntry(
        id=row.id,
        tenant_id=row.tenant_id,
        project_id=row.project_id,
        name=row.name,
        status=row.status,
        replicas=[
            ReplicaEntry(name=r.name, url=r.url)
            for r in sorted(replicas, key=lambda r: r.name)
            if r.state == ReplicaState.READY and r.url
        ],
    )


def carry_counts(entry: EndpointEntry, previous: EndpointEntry | None) -> None:
    """A reloaded endpoint keeps its in-flight counts (of the replicas that stay)."""
    if previous is None:
        return
    entry.in_flight = previous.in_flight
    entry.remote_in_flight = previous.remote_in_flight
    counts = {r.url: r.in_flight for r in previous.replicas}
    for replica in entry.replicas:
        replica.in_flight = counts.get(replica.url, 0)


def router_entry(row: Router, previous: RouterEntry | None) -> RouterEntry:
    """The router as the gateway uses it; cooldowns and latency state survive a reload."""
    targets: list[TargetEntry] = []
    for index, target in enumerate(row.targets):
        # An endpoint, or a cloud model (kept in the table's endpoints under its id).
        endpoint_id = target.get("endpoint_id") or target.get("model_id")
        if endpoint_id is None:
            continue
        key = f"{row.id}:{index}"
        targets.append(
            TargetEntry(
                key=key,
                endpoint_id=uuid.UUID(str(endpoint_id)),
                rpm=target.get("rpm"),
                tpm=target.get("tpm"),
                stats=TargetStats(key, weight=float(target.get("weight", 1.0))),
            )
        )
    fallbacks: list[tuple[str, uuid.UUID]] = []
    for fallback in row.fallbacks:
        for kind in ("router", "endpoint", "model"):
            ref = fallback.get(f"{kind}_id")
            if ref is not None:
                # A cloud model is reached like an endpoint.
                reached = "router" if kind == "router" else "endpoint"
                fallbacks.append((reached, uuid.UUID(str(ref))))
    policy = CooldownPolicy(**row.cooldown) if row.cooldown else CooldownPolicy()
    cooldowns = previous.cooldowns if previous is not None else Cooldowns(policy)
    cooldowns.policy = policy
    strategy = row.strategy if row.strategy in STRATEGIES else DEFAULT_STRATEGY
    return RouterEntry(
        id=row.id,
        tenant_id=row.tenant_id,
        project_id=row.project_id,
        name=row.name,
        strategy=strategy,
        targets=targets,
        fallbacks=fallbacks,
        retries=row.retries,
        retry_backoff_s=row.retry_backoff_s,
        timeout_s=row.timeout_s,
        cooldowns=cooldowns,
    )


def _live_key_query() -> Any:
    return (
        select(ApiKey)
        .join(Project, col(Project.id) == col(ApiKey.project_id))
        .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
        .where(
            col(ApiKey.revoked_at).is_(None),
            col(Project.status) == ProjectStatus.ACTIVE.value,
            col(Tenant.status) == TenantStatus.ACTIVE.value,
        )
    )


def _routable_endpoint_query() -> Any:
    return select(Endpoint).where(
        col(Endpoint.published).is_(True),
        col(Endpoint.status).in_([s.value for s in ROUTABLE]),
    )


class TableLoader:
    """Fills a `RoutingTable` from PostgreSQL and keeps it current."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        table: RoutingTable,
        *,
        vault: Vault | None = None,
    ) -> None:
        self.sessions = sessions
        self.table = table
        # Opens the credentials of cloud models that routers target (None: skipped).
        self.vault = vault

    async def load_all(self) -> None:
        async with session_scope(self.sessions) as session:
            keys = (await session.exec(_live_key_query())).all()
            endpoints = (await session.exec(_routable_endpoint_query())).all()
            replicas: dict[uuid.UUID, list[EndpointReplica]] = {}
            if endpoints:
                rows = await session.exec(
                    select(EndpointReplica).where(
                        col(EndpointReplica.endpoint_id).in_([e.id for e in endpoints])
                    )
                )
                for replica in rows.all():
                    replicas.setdefault(replica.endpoint_id, []).append(replica)
            routers = (
                await session.exec(select(Router).where(col(Router.status) == "active"))
            ).all()
            clouds = await self._clouds(session, routers)
        table = self.table
        table.keys = {k.prefix: key_entry(k) for k in keys}
        fresh = {e.id: endpoint_entry(e, replicas.get(e.id, ())) for e in endpoints}
        fresh.update(clouds)
        for endpoint_id, entry in fresh.items():
            carry_counts(entry, table.endpoints.get(endpoint_id))
        table.endpoints = fresh
        table.routers = {r.id: router_entry(r, table.routers.get(r.id)) for r in routers}
        table.loaded = True
        table.notify()

    async def _clouds(
        self, session: AsyncSession, routers: Sequence[Router]
    ) -> dict[uuid.UUID, EndpointEntry]:
        """The ready cloud models the routers target or fall back to, with their
        credentials opened (never logged)."""
        wanted = {
            uuid.UUID(str(ref["model_id"]))
            for router in routers
            for ref in (*router.targets, *router.fallbacks)
            if ref.get("model_id")
        }
        if not wanted or self.vault is None:
            return {}
        rows = (
            await session.exec(
                select(Model).where(
                    col(Model.id).in_(wanted),
                    col(Model.source_kind) == SourceKind.CLOUD.value,
                    col(Model.status) == ModelStatus.READY.value,
                )
            )
        ).all()
        found: dict[uuid.UUID, EndpointEntry] = {}
        for row in rows:
            entry = await self._cloud_entry(session, row)
            if entry is not None:
                found[row.id] = entry
        return found

    async def _cloud_entry(self, session: AsyncSession, row: Model) -> EndpointEntry | None:
        assert self.vault is not None
        provider, _, upstream_model = row.source_ref.partition("/")
        if row.credential_id is None or provider != "openai":
            # Anthropic needs a translation of the request and the answer, Azure its own
            # URL scheme: not served by the gateway yet.
            log.warning("gateway.cloud.unsupported", model=row.name, provider=provider)
            return None
        try:
            secret = await reveal(
                session,
                self.vault,
                row.credential_id,
                tenant_id=row.tenant_id,
                project_id=row.project_id,
            )
        except Exception as err:
            log.warning("gateway.cloud.credential_unusable", model=row.name, error=str(err))
            return None
        base = str(secret.get("base_url") or OPENAI_BASE_URL).rstrip("/")
        headers = {"authorization": f"Bearer {secret['api_key']}"}
        if secret.get("organization"):
            headers["openai-organization"] = str(secret["organization"])
        return EndpointEntry(
            id=row.id,
            tenant_id=row.tenant_id,
            project_id=row.project_id or uuid.UUID(int=0),
            name=row.name,
            status=EndpointStatus.RUNNING.value,
            replicas=[ReplicaEntry(name=provider, url=base.removesuffix("/v1"))],
            cloud=True,
            upstream_model=upstream_model,
            headers=headers,
        )

    async def apply(self, change: Change) -> None:
        """Reload the one entry a notice names (everything for a project change)."""
        if change.kind in (ChangeKind.PROJECT, ChangeKind.MODEL):
            await self.load_all()
            return
        try:
            entity_id = uuid.UUID(change.id)
        except ValueError:
            return
        async with session_scope(self.sessions) as session:
            if change.kind is ChangeKind.API_KEY:
                await self._reload_key(session, entity_id)
            elif change.kind is ChangeKind.ENDPOINT:
                await self._reload_endpoint(session, entity_id)
            elif change.kind is ChangeKind.ROUTER:
                await self._reload_router(session, entity_id)
        self.table.notify()

    async def _reload_key(self, session: AsyncSession, key_id: uuid.UUID) -> None:
        table = self.table
        for prefix, entry in list(table.keys.items()):
            if entry.id == key_id:
                del table.keys[prefix]
        row = (await session.exec(_live_key_query().where(col(ApiKey.id) == key_id))).first()
        if row is not None:
            table.keys[row.prefix] = key_entry(row)

    async def _reload_endpoint(self, session: AsyncSession, endpoint_id: uuid.UUID) -> None:
        table = self.table
        row = (
            await session.exec(_routable_endpoint_query().where(col(Endpoint.id) == endpoint_id))
        ).first()
        if row is None:
            table.endpoints.pop(endpoint_id, None)
            return
        replicas = (
            await session.exec(
                select(EndpointReplica).where(col(EndpointReplica.endpoint_id) == endpoint_id)
            )
        ).all()
        entry = endpoint_entry(row, replicas)
        carry_counts(entry, table.endpoints.get(endpoint_id))
        table.endpoints[endpoint_id] = entry

    async def _reload_router(self, session: AsyncSession, router_id: uuid.UUID) -> None:
        table = self.table
        row = await session.get(Router, router_id)
        if row is None or row.status != "active":
            table.routers.pop(router_id, None)
            return
        for model_id, entry in (await self._clouds(session, [row])).items():
            carry_counts(entry, table.endpoints.get(model_id))
            table.endpoints[model_id] = entry
        table.routers[router_id] = router_entry(row, table.routers.get(router_id))

    async def follow(self, redis: Redis, reload_seconds: float) -> None:
        """Apply change notices as they come; reload everything after a (re)subscribe,
        since notices published meanwhile are lost, and every `reload_seconds`."""
        backoff = 0.5
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    await self.load_all()
                    backoff = 0.5
                    next_full = time.monotonic() + reload_seconds
                    while True:
                        timeout = max(0.0, next_full - time.monotonic())
                        message = await pubsub.get_message(timeout=min(timeout, 1.0))
                        if message is not None:
                            change = Change.decode(message["data"])
                            if change is not None:
                                await self.apply(change)
                        if time.monotonic() >= next_full:
                            await self.load_all()
                            next_full = time.monotonic() + reload_seconds
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("gateway.table.follow_failed", error=str(err), retry_in=backoff)
                # Without notices, keep the table fresh by polling until Redis is back.
                with contextlib.suppress(Exception):
                    await self.load_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
