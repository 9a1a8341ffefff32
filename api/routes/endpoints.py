"""Endpoints: deploy (202 + the `DeployEndpoint` workflow), list, inspect, autoscale,
scale, logs, delete.

Endpoints belong to a project. Each one is owned by its workflow `endpoint-{id}`; follow
it at `/api/v1/workflows/endpoint-{id}` or in the Temporal UI under
`CpResourceKind = 'endpoint'`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status

from api.deps import CurrentPrincipal, Limit, Order, PageNo, SessionDep, StateDep
from api.errors import problems
from control_plane.endpoints.schemas import (
    AutoscalePatch,
    EndpointCreate,
    EndpointDetail,
    EndpointList,
    EndpointLogs,
    EndpointRead,
    ScaleBody,
)
from control_plane.endpoints.service import EndpointService, ListFilters
from workflows.contracts.endpoints import EndpointStatus

router = APIRouter(prefix="/api/v1/endpoints", tags=["endpoints"])

EndpointId = Annotated[uuid.UUID, Path()]
Sort = Literal["name", "status", "engine", "created_at", "updated_at"]


def service(state: StateDep, session: SessionDep) -> EndpointService:
    return EndpointService(
        session,
        state.temporal,
        vault=state.vault,
        queue_prefix=state.settings.temporal.task_queue_prefix,
        replicas_dir=state.settings.data_dir / "replicas",
    )


@router.post(
    "",
    response_model=EndpointRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def create_endpoint(
    body: EndpointCreate, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> EndpointRead:
    """Deploy a model (or the simulator) as an endpoint. Returns at once with status
    `pending`; the `DeployEndpoint` workflow places it (the named cluster, or the best
    fit for the model's memory), starts the replicas, waits until they answer a real
    request, publishes it to the routing table (`running`) and then keeps it healthy
    and autoscaled."""
    return await service(state, session).create(principal, body)


@router.get("", response_model=EndpointList, responses=problems(401, 403, 404))
async def list_endpoints(
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    project_id: uuid.UUID | None = None,
    status: EndpointStatus | None = None,
    include_deleted: bool = False,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Sort = "name",
    order: Order = "asc",
) -> EndpointList:
    """Endpoints of the projects the caller can see."""
    return await service(state, session).list(
        principal,
        ListFilters(project_id=project_id, status=status, include_deleted=include_deleted),
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.get("/{endpoint_id}", response_model=EndpointDetail, responses=problems(401, 404))
async def get_endpoint(
    endpoint_id: EndpointId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> EndpointDetail:
    """The endpoint with its replicas (health, URL, load) and latest scaling events."""
    return await service(state, session).get(principal, endpoint_id)


@router.patch(
    "/{endpoint_id}/autoscale",
    response_model=EndpointRead,
    responses=problems(401, 403, 404, 409, 503),
)
async def set_autoscale(
    endpoint_id: EndpointId,
    body: AutoscalePatch,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
) -> EndpointRead:
    """Change the autoscaling policy (the fields sent; the others keep their values); the
    endpoint's workflow applies it at once. A merged policy that contradicts itself
    (minimum above maximum) is a 409."""
    return await service(state, session).set_autoscale(principal, endpoint_id, body)


@router.post(
    "/{endpoint_id}/scale",
    response_model=EndpointRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def scale_endpoint(
    endpoint_id: EndpointId,
    body: ScaleBody,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
) -> EndpointRead:
    """Pin the replica count (`{"replicas": n}`) until cleared (`{"replicas": null}`)."""
    return await service(state, session).scale(principal, endpoint_id, body)


@router.get("/{endpoint_id}/logs", response_model=EndpointLogs, responses=problems(401, 404, 503))
async def endpoint_logs(
    endpoint_id: EndpointId,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    replica: Annotated[str | None, Query(max_length=255, pattern=r"^[a-z0-9][a-z0-9.\-]*$")] = None,
    tail: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> EndpointLogs:
    """The last `tail` lines of each replica's log (or of one replica)."""
    return await service(state, session).logs(principal, endpoint_id, replica, tail)


@router.delete(
    "/{endpoint_id}",
    response_model=EndpointRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 503),
)
async def delete_endpoint(
    endpoint_id: EndpointId,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    grace_s: Annotated[float, Query(ge=0, le=3600)] = 10.0,
) -> EndpointRead:
    """Unpublish the endpoint at once, let in-flight requests finish (up to `grace_s`),
    remove its replicas and mark it `deleted`."""
    return await service(state, session).delete(principal, endpoint_id, grace_s=grace_s)
