"""Routers: create, read, list, update, delete (project-scoped, no workflow).

Routers belong to a project: its viewers read them, members write them. What a router
names must be usable when it is named: endpoints of the same project that are not being
deleted, `ready` cloud models of the project or tenant, live routers of the same project.
What it already names may go away later (an endpoint deleted, a model deprecated): the
router keeps the reference, its read shows the target's status, and the gateway skips
it. So a PATCH checks only the references it adds, and the merged router as a whole.

Conventions, as for endpoints: a reference the caller cannot see (missing, deleted, in
another project or tenant) is a 404 that does not say which; a reference of the wrong
kind (a model that is not a cloud model) is a 422; a reference in the wrong state, a
taken name, a fallback to itself or a loop of fallbacks is a 409.

Every committed change is announced to the gateways (`publish_change`), after the
commit: a gateway that reloads on the notice must find the new state.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.audit import service as audit
from control_plane.core.db import after_commit, utcnow
from control_plane.core.errors import Conflict, NotFound
from control_plane.credentials.errors import InvalidFields
from control_plane.endpoints.repository import EndpointRepository
from control_plane.identity.permissions import Principal, authorize
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import ProjectStatus
from control_plane.routing.changes import ChangeKind, publish_change
from control_plane.routing.repository import RouterRepository, lock_key, lock_name
from control_plane.routing.schemas import (
    RefKind,
    RefState,
    Resolved,
    RouterCreate,
    RouterFallback,
    RouterList,
    RouterRead,
    RouterSpec,
    RouterStatus,
    RouterTarget,
    RouterUpdate,
    spec_of,
)
from control_plane.routing.tables import Router
from workflows.contracts.endpoints import EndpointStatus
from workflows.contracts.models import ModelStatus, SourceKind

RESOURCE_KIND = "router"
# Endpoints that will not serve again: a router may not start naming them.
ENDPOINT_GONE = (EndpointStatus.DELETING, EndpointStatus.FAILED)

Ref = tuple[RefKind, uuid.UUID]
Named = tuple[str, Ref]


def _invalid(field: str, message: str) -> InvalidFields:
    return InvalidFields(
        f"body.{field}: {message}",
        errors=[{"loc": ["body", field], "msg": message, "type": "value_error"}],
    )


def _refs(targets: Iterable[RouterTarget], fallbacks: Iterable[RouterFallback]) -> list[Named]:
    """Each reference with the body field that holds it."""
    return [("targets", t.ref) for t in targets] + [("fallbacks", f.ref) for f in fallbacks]


@dataclass(frozen=True)
class ListFilters:
    project_id: uuid.UUID | None = None
    status: RouterStatus | None = None


class RouterService:
    def __init__(self, session: AsyncSession, redis: Redis) -> None:
        self.session = session
        self.repo = RouterRepository(session)
        self.redis = redis

    # --- access ---------------------------------------------------------------------

    async def _project(self, principal: Principal, project_id: uuid.UUID, scope: str) -> None:
        project = await IdentityRepository(self.session).project(project_id)
        if (
            project is None
            or project.status != ProjectStatus.ACTIVE.value
            or project.tenant_id != principal.tenant_id
        ):
            raise NotFound("project not found")
        authorize(
            principal, scope, tenant_id=project.tenant_id, project_id=project.id, what="project"
        )

    async def _require(
        self, principal: Principal, router_id: uuid.UUID, scope: str, *, for_update: bool = False
    ) -> Router:
        row = await self.repo.get(router_id, for_update=for_update)
        if (
            row is None
            or row.status == RouterStatus.DELETED.value
            or row.tenant_id != principal.tenant_id
        ):
            raise NotFound("router not found")
        authorize(
            principal, scope, tenant_id=row.tenant_id, project_id=row.project_id, what="router"
        )
        return row

    async def _audit(
        self, principal: Principal, action: str, row: Router, details: dict[str, Any]
    ) -> None:
        await audit.record(
            self.session,
            actor=principal,
            action=action,
            resource_kind=RESOURCE_KIND,
            resource_id=row.id,
            tenant_id=row.tenant_id,
            project_id=row.project_id,
            details=details,
        )

    def _announce(self, router_id: uuid.UUID) -> None:
        async def publish(_: AsyncSession) -> None:
            # Best effort (logged when Redis is down): gateways also reload periodically.
            await publish_change(self.redis, ChangeKind.ROUTER, router_id)

        after_commit(self.session, publish)

    # --- rules ----------------------------------------------------------------------

    async def _ensure_name_free(
        self, project_id: uuid.UUID, name: str, *, other_than: uuid.UUID | None = None
    ) -> None:
        await lock_name(self.session, project_id, name)
        if await self.repo.name_taken(project_id, name, other_than=other_than):
            raise Conflict(f"a router named {name!r} already exists in the project", name=name)
        if await EndpointRepository(self.session).name_taken(project_id, name):
            raise Conflict(
                f"an endpoint named {name!r} already exists in the project; routers and "
                "endpoints share one namespace (clients send either name as `model`)",
                name=name,
            )

    async def _check_new_refs(
        self, principal: Principal, project_id: uuid.UUID, refs: Sequence[Named]
    ) -> None:
        """Each reference names something of the project (or, for a cloud model, of the
        tenant) that can take traffic now."""
        wanted: dict[RefKind, set[uuid.UUID]] = {"endpoint": set(), "model": set(), "router": set()}
        for _, (kind, ref_id) in refs:
            wanted[kind].add(ref_id)
        endpoints = {e.id: e for e in await self.repo.endpoints(wanted["endpoint"])}
        models = {m.id: m for m in await self.repo.models(wanted["model"])}
        routers = {r.id: r for r in await self.repo.routers(wanted["router"])}
        for field, (kind, ref_id) in refs:
            if kind == "endpoint":
                endpoint = endpoints.get(ref_id)
                if (
                    endpoint is None
                    or endpoint.tenant_id != principal.tenant_id
                    or endpoint.project_id != project_id
                    or endpoint.status == EndpointStatus.DELETED.value
                ):
                    raise NotFound(f"endpoint {ref_id} not found in the project")
                if EndpointStatus(endpoint.status) in ENDPOINT_GONE:
                    raise Conflict(
                        f"endpoint {endpoint.name!r} is {endpoint.status}; it cannot take "
                        "traffic from a router"
                    )
            elif kind == "model":
                model = models.get(ref_id)
                if (
                    model is None
                    or model.status == ModelStatus.DELETED.value
                    or model.tenant_id != principal.tenant_id
                    or model.project_id not in (None, project_id)
                ):
                    raise NotFound(f"model {ref_id} not found in the project or tenant")
                if model.source_kind != SourceKind.CLOUD.value:
                    raise _invalid(
                        field,
                        f"model {model.name!r} is not a cloud model; deploy it as an endpoint "
                        "and route to the endpoint",
                    )
                if model.status != ModelStatus.READY.value:
                    raise Conflict(
                        f"model {model.name!r} is {model.status}; only ready models take traffic"
                    )
            else:
                router = routers.get(ref_id)
                if (
                    router is None
                    or router.tenant_id != principal.tenant_id
                    or router.project_id != project_id
                    or router.status == RouterStatus.DELETED.value
                ):
                    raise NotFound(f"router {ref_id} not found in the project")

    async def _check_no_loop(self, row: Router, fallbacks: Sequence[RouterFallback]) -> None:
        """A fallback chain of routers must end: `row` may not reach itself."""
        direct = [f.router_id for f in fallbacks if f.router_id is not None]
        if row.id in direct:
            raise Conflict(f"router {row.name!r} cannot fall back to itself")
        if not direct:
            return
        # Two routers made each other's fallback at once would each see no loop.
        await lock_key(self.session, f"cp-fallbacks:{row.project_id}")
        graph = await self.repo.fallback_graph(row.project_id)
        graph[row.id] = direct
        seen: set[uuid.UUID] = set()
        stack = list(direct)
        while stack:
            current = stack.pop()
            if current == row.id:
                raise Conflict(
                    f"router {row.name!r} would reach itself through its fallbacks; "
                    "fallback chains of routers must end"
                )
            if current not in seen:
                seen.add(current)
                stack.extend(graph.get(current, ()))

    async def _resolve(self, rows: Sequence[Router]) -> Resolved:
        """The name and status now of everything `rows` name, in three queries."""
        refs: set[Ref] = set()
        for row in rows:
            for t in row.targets:
                refs.add(RouterTarget.model_validate(t).ref)
            for f in row.fallbacks:
                refs.add(RouterFallback.model_validate(f).ref)
        ids: dict[RefKind, set[uuid.UUID]] = {"endpoint": set(), "model": set(), "router": set()}
        for kind, ref_id in refs:
            ids[kind].add(ref_id)
        resolved: Resolved = {}
        for endpoint in await self.repo.endpoints(ids["endpoint"]):
            resolved["endpoint", endpoint.id] = RefState(
                kind="endpoint", name=endpoint.name, status=endpoint.status
            )
        for model in await self.repo.models(ids["model"]):
            resolved["model", model.id] = RefState(
                kind="model", name=model.name, status=model.status
            )
        for router in await self.repo.routers(ids["router"]):
            resolved["router", router.id] = RefState(
                kind="router", name=router.name, status=router.status
            )
        return resolved

    async def _read(self, row: Router) -> RouterRead:
        return RouterRead.of(row, await self._resolve([row]))

    # --- create ---------------------------------------------------------------------

    async def create(self, principal: Principal, body: RouterCreate) -> RouterRead:
        await self._project(principal, body.project_id, "routers:write")
        await self._ensure_name_free(body.project_id, body.name)
        await self._check_new_refs(principal, body.project_id, _refs(body.targets, body.fallbacks))
        row = Router(
            tenant_id=principal.tenant_id,
            project_id=body.project_id,
            status=RouterStatus.ACTIVE.value,
            created_by=principal.user_id,
            **_columns(body),
        )
        self.session.add(row)
        await self.session.flush()
        await self._audit(
            principal, "router.create", row, {"name": row.name, "strategy": row.strategy}
        )
        self._announce(row.id)
        return await self._read(row)

    # --- reads ----------------------------------------------------------------------

    async def list(
        self,
        principal: Principal,
        filters: ListFilters,
        *,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> RouterList:
        if filters.project_id is not None:
            await self._project(principal, filters.project_id, "routers:read")
        else:
            authorize(principal, "routers:read", tenant_id=principal.tenant_id, what="router")
        visible = principal.visible_projects()
        query = self.repo.listing(
            principal.tenant_id,
            None if visible is None else sorted(visible),
            project_id=filters.project_id,
            status=filters.status,
        )
        rows, total = await self.repo.page(
            query, page=page, limit=limit, sort=sort, descending=descending
        )
        resolved = await self._resolve(rows)
        return RouterList(
            items=[RouterRead.of(row, resolved) for row in rows],
            total=total,
            page=page,
            limit=limit,
        )

    async def get(self, principal: Principal, router_id: uuid.UUID) -> RouterRead:
        return await self._read(await self._require(principal, router_id, "routers:read"))

    # --- update ---------------------------------------------------------------------

    async def update(
        self, principal: Principal, router_id: uuid.UUID, body: RouterUpdate
    ) -> RouterRead:
        row = await self._require(principal, router_id, "routers:write", for_update=True)
        sent = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
        if not sent:
            return await self._read(row)
        current = spec_of(row)
        if "cooldown" in sent:
            patch = {k: v for k, v in sent["cooldown"].items() if v is not None}
            sent["cooldown"] = {**current["cooldown"], **patch}
        try:
            merged = RouterSpec.model_validate({**current, **sent})
        except ValidationError as err:
            problems = "; ".join(e["msg"] for e in err.errors(include_url=False))
            raise Conflict(f"the resulting router is invalid: {problems}") from None
        if merged.name != row.name:
            await self._ensure_name_free(row.project_id, merged.name, other_than=row.id)
        known = {RouterTarget.model_validate(t).ref for t in row.targets} | {
            RouterFallback.model_validate(f).ref for f in row.fallbacks
        }
        added = [
            named for named in _refs(merged.targets, merged.fallbacks) if named[1] not in known
        ]
        await self._check_new_refs(principal, row.project_id, added)
        if "fallbacks" in sent:
            await self._check_no_loop(row, merged.fallbacks)
        changed = sorted(k for k, v in _columns(merged).items() if getattr(row, k) != v)
        if not changed:
            return await self._read(row)
        for key, value in _columns(merged).items():
            setattr(row, key, value)
        self.session.add(row)
        await self.session.flush()
        await self._audit(principal, "router.update", row, {"name": row.name, "changed": changed})
        self._announce(row.id)
        return await self._read(row)

    # --- delete ---------------------------------------------------------------------

    async def delete(self, principal: Principal, router_id: uuid.UUID) -> None:
        """Mark the router deleted (its name is free again at once). Routers that fall
        back to it keep the reference, shown as `deleted`; the gateway skips it."""
        row = await self._require(principal, router_id, "routers:write", for_update=True)
        row.status = RouterStatus.DELETED.value
        row.deleted_at = utcnow()
        self.session.add(row)
        await self.session.flush()
        await self._audit(principal, "router.delete", row, {"name": row.name})
        self._announce(row.id)


def _columns(spec: RouterSpec) -> dict[str, Any]:
    """The router's columns as stored (JSON for the lists and the policy)."""
    data = spec.model_dump(mode="json")
    return {key: data[key] for key in RouterSpec.model_fields}
