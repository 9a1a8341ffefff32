"""Which workflows and activities each pool's worker runs.

Every pool answers `ping_pool` so `DiagnoseSystem` can see it. Later issues add their
workflows to the orchestration pool and their activities to the pool that suits them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from activities.bookkeeping import BookkeepingActivities
from activities.system import SystemActivities
from workflows.queues import Queue
from workflows.system import DiagnoseSystem


@dataclass
class WorkerResources:
    """Clients built once per worker process and handed to activity constructors."""

    sessions: async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class PoolSpec:
    queue: Queue
    workflows: Sequence[type] = ()
    activities: Callable[[WorkerResources], list[Callable[..., Any]]] = lambda _: []
    # Heavy pools (disk, network, CPU) take few activities at once per worker.
    max_concurrent_activities: int | None = None
    description: str = ""


def _system(_: WorkerResources) -> list[Callable[..., Any]]:
    return [SystemActivities().ping_pool]


def _orchestration(resources: WorkerResources) -> list[Callable[..., Any]]:
    return [BookkeepingActivities(resources.sessions).record_workflow_run, *_system(resources)]


POOLS: dict[Queue, PoolSpec] = {
    Queue.ORCHESTRATION: PoolSpec(
        Queue.ORCHESTRATION,
        workflows=[DiagnoseSystem],
        activities=_orchestration,
        description="all workflows; DB bookkeeping activities",
    ),
    Queue.CLUSTER: PoolSpec(
        Queue.CLUSTER, activities=_system, description="cluster connect/discover/health"
    ),
    Queue.MODEL: PoolSpec(
        Queue.MODEL,
        activities=_system,
        max_concurrent_activities=4,
        description="download, hash, scan, license, metadata",
    ),
    Queue.DEPLOY: PoolSpec(
        Queue.DEPLOY, activities=_system, description="replicas and readiness probes"
    ),
    Queue.BENCHMARK: PoolSpec(
        Queue.BENCHMARK,
        activities=_system,
        max_concurrent_activities=2,
        description="load generation, one run per worker",
    ),
    Queue.SYNC: PoolSpec(Queue.SYNC, activities=_system, description="cloud catalog sync"),
}
