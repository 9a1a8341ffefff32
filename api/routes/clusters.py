"""Clusters: onboard (202 + workflow), list, inspect, refresh, delete, and placement.

Clusters belong to the tenant: every user of the tenant reads them, tenant admins write
them. Onboarding, watching and deletion are workflows (`cluster-onboard-{id}`,
`cluster-monitor-{id}`, `cluster-delete-{id}`); follow them at
`/api/v1/workflows/{workflow_id}` or in the Temporal UI under `CpResourceKind = 'cluster'`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status

from api.deps import CurrentPrincipal, Limit, Order, PageNo, SessionDep, StateDep
from api.errors import problems
from control_plane.clusters.placement import Demand
from control_plane.clusters.schemas import (
    ClusterCreate,
    ClusterDetail,
    ClusterList,
    ClusterRead,
    RecommendationList,
)
from control_plane.clusters.service import ClusterService, ListFilters
from workflows.contracts.clusters import ClusterKind, ClusterStatus

# `{cluster_id:uuid}` only matches ids, so `/clusters/recommendations` never reaches the
# per-cluster routes (a DELETE there is a 405, not an invalid id).
router = APIRouter(prefix="/api/v1/clusters", tags=["clusters"])

ClusterId = Annotated[uuid.UUID, Path()]
Sort = Literal["name", "kind", "status", "created_at", "updated_at"]


def service(state: StateDep, session: SessionDep) -> ClusterService:
    return ClusterService(
        session,
        state.vault,
        state.temporal,
        queue_prefix=state.settings.temporal.task_queue_prefix,
    )


@router.post(
    "",
    response_model=ClusterRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def create_cluster(
    body: ClusterCreate, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> ClusterRead:
    """Onboard a cluster (tenant admins): `local` (the machine the workers run on) or
    `kubernetes` (a tenant-wide kubeconfig credential, or in-cluster config). Returns at
    once with status `onboarding` and the `OnboardCluster` workflow id; the same API
    server onboarded twice in a tenant is a 409, an unusable credential a 422."""
    return await service(state, session).create(principal, body)


@router.get("", response_model=ClusterList, responses=problems(401, 404))
async def list_clusters(
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    status: ClusterStatus | None = None,
    kind: ClusterKind | None = None,
    include_deleted: bool = False,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Sort = "name",
    order: Order = "asc",
) -> ClusterList:
    """The tenant's clusters with their capacity (deleted ones only on request)."""
    return await service(state, session).list(
        principal,
        ListFilters(status=status, kind=kind, include_deleted=include_deleted),
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.get("/recommendations", response_model=RecommendationList, responses=problems(401))
async def recommend_clusters(
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    memory_mb: Annotated[
        int,
        Query(
            ge=1,
            le=100_000_000,
            description="Memory one replica needs (weights + KV cache for its context), MiB",
        ),
    ],
    replicas: Annotated[int, Query(ge=1, le=1000)] = 1,
    device: Literal["gpu", "cpu"] = "gpu",
) -> RecommendationList:
    """Rank the tenant's available and degraded clusters for a deployment: those whose
    free accelerators (or CPU memory for CPU engines) hold the replicas first, then by
    free headroom. Every entry says why it fits or not."""
    demand = Demand(memory_mb=memory_mb, replicas=replicas, device=device)
    return await service(state, session).recommendations(principal, demand)


@router.get("/{cluster_id:uuid}", response_model=ClusterDetail, responses=problems(401, 404))
async def get_cluster(
    cluster_id: ClusterId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> ClusterDetail:
    """The cluster with its nodes, accelerators and status history (newest first)."""
    return await service(state, session).get(principal, cluster_id)


@router.post(
    "/{cluster_id:uuid}/refresh",
    response_model=ClusterRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def refresh_cluster(
    cluster_id: ClusterId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> ClusterRead:
    """Signal the cluster's monitor to check health and inventory now."""
    return await service(state, session).refresh(principal, cluster_id)


@router.delete(
    "/{cluster_id:uuid}",
    response_model=ClusterRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def delete_cluster(
    cluster_id: ClusterId,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    force: bool = False,
) -> ClusterRead:
    """Start `DeleteCluster`: stop the monitor, remove what onboarding created, mark the
    cluster `deleted`. With `force`, a cluster that cannot be reached is marked deleted
    anyway (its objects stay on it). A cluster still onboarding is a 409: cancel its
    onboarding workflow instead."""
    return await service(state, session).delete(principal, cluster_id, force=force)
