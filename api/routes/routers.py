"""Routers: named routing rules of a project that spread requests over its endpoints and
cloud models (strategy, weights, per-target limits, retries, fallbacks, cooldowns).

Clients of the gateway send a router's name as `model`. Changes take effect without a
workflow: the gateways are told after each committed change and reload the router.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response, status

from api.deps import CurrentPrincipal, Limit, Order, PageNo, SessionDep, StateDep
from api.errors import problems
from control_plane.routing.schemas import (
    RouterCreate,
    RouterList,
    RouterRead,
    RouterStatus,
    RouterUpdate,
)
from control_plane.routing.service import ListFilters, RouterService

router = APIRouter(prefix="/api/v1/routers", tags=["routers"])

RouterId = Annotated[uuid.UUID, Path()]
Sort = Literal["name", "strategy", "status", "created_at", "updated_at"]


def service(state: StateDep, session: SessionDep) -> RouterService:
    return RouterService(session, state.redis)


@router.post(
    "",
    response_model=RouterRead,
    status_code=status.HTTP_201_CREATED,
    responses=problems(401, 403, 404, 409),
)
async def create_router(
    body: RouterCreate, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> RouterRead:
    """Create a router in a project (`routers:write`). Targets are endpoints of the
    project or `ready` cloud models of the project or tenant; fallbacks may also name
    other routers of the project. The name must be free among the project's routers and
    endpoints (409). A target or fallback the caller cannot see is a 404; one that cannot
    take traffic (an endpoint being deleted, a model not ready) a 409."""
    return await service(state, session).create(principal, body)


@router.get("", response_model=RouterList, responses=problems(401, 403, 404))
async def list_routers(
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    project_id: uuid.UUID | None = None,
    status: RouterStatus | None = None,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Sort = "name",
    order: Order = "asc",
) -> RouterList:
    """Routers of the projects the caller can see (live ones unless `status=deleted`),
    each with the current name and status of what it points at."""
    return await service(state, session).list(
        principal,
        ListFilters(project_id=project_id, status=status),
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.get("/{router_id}", response_model=RouterRead, responses=problems(401, 404))
async def get_router(
    router_id: RouterId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> RouterRead:
    """The router, with the current name and status of each target and fallback (a
    deleted endpoint shows as `deleted`: the gateway skips it)."""
    return await service(state, session).get(principal, router_id)


@router.patch("/{router_id}", response_model=RouterRead, responses=problems(401, 403, 404, 409))
async def update_router(
    router_id: RouterId,
    body: RouterUpdate,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
) -> RouterRead:
    """Change the fields sent (`routers:write`); `targets` and `fallbacks` replace the
    lists, `cooldown` the fields it names. The merged router is checked as a whole: one
    that contradicts itself (a fallback that is also a target, a fallback to itself or a
    loop of fallback routers) is a 409, and only the references it adds must be usable
    now."""
    return await service(state, session).update(principal, router_id, body)


@router.delete(
    "/{router_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(401, 403, 404),
)
async def delete_router(
    router_id: RouterId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> None:
    """Mark the router deleted (`routers:write`); its name is free again at once and the
    gateways stop resolving it."""
    await service(state, session).delete(principal, router_id)
