"""Which workflows and activities each pool's worker runs.

Every pool answers `ping_pool` so `DiagnoseSystem` can see it. Later issues add their
workflows to the orchestration pool and their activities to the pool that suits them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from activities.bookkeeping import BookkeepingActivities
from activities.clusters import ClusterActivities
from activities.endpoints import EndpointActivities
from activities.models import ModelActivities
from activities.system import SystemActivities
from control_plane.core.config import ModelSettings
from control_plane.core.storage import ObjectStore
from control_plane.credentials.crypto import Vault
from workflows.clusters import DeleteCluster, MonitorCluster, OnboardCluster
from workflows.endpoints import DeployEndpoint
from workflows.models import OnboardModel, RescanModels, SyncCloudModels
from workflows.queues import Queue
from workflows.system import DiagnoseSystem


@dataclass
class WorkerResources:
    """Clients built once per worker process and handed to activity constructors."""

    sessions: async_sessionmaker[AsyncSession]
    vault: Vault
    # Where the `local` provider keeps per-cluster working files.
    data_dir: Path
    objects: ObjectStore
    models: ModelSettings
    # The NVIDIA tool the `local` provider asks for GPUs (absent: no GPUs).
    nvidia_smi: str = "nvidia-smi"
    # Where routing-table change notices go (None: gateways see changes by polling).
    redis: Redis | None = None

    def model_activities(self) -> ModelActivities:
        return ModelActivities(
            self.sessions,
            self.vault,
            self.objects,
            self.models,
            staging_dir=self.models.staging_dir or (self.data_dir / "staging"),
        )

    def clusters(self) -> ClusterActivities:
        return ClusterActivities(
            self.sessions,
            self.vault,
            work_dir=self.data_dir / "clusters",
            nvidia_smi=self.nvidia_smi,
            replicas_dir=self.data_dir / "replicas",
        )

    def endpoints(self) -> EndpointActivities:
        return EndpointActivities(
            self.sessions,
            self.clusters(),
            self.objects,
            model_cache=self.data_dir / "model-cache",
            redis=self.redis,
        )


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
    clusters = resources.clusters()
    models = resources.model_activities()
    endpoints = resources.endpoints()
    return [
        BookkeepingActivities(resources.sessions).record_workflow_run,
        endpoints.prepare_endpoint,
        endpoints.save_endpoint_state,
        clusters.set_cluster_status,
        clusters.save_cluster_inventory,
        models.set_model_status,
        models.decide_model_license,
        models.record_license_review,
        models.models_to_rescan,
        models.apply_scan_verdict,
        models.catalog_tenants,
        *_system(resources),
    ]


def _model(resources: WorkerResources) -> list[Callable[..., Any]]:
    models = resources.model_activities()
    return [
        models.resolve_model,
        models.download_model,
        models.scan_model,
        models.extract_model_metadata,
        models.discard_model_artifacts,
        *_system(resources),
    ]


def _sync(resources: WorkerResources) -> list[Callable[..., Any]]:
    return [resources.model_activities().sync_tenant_catalog, *_system(resources)]


def _deploy(resources: WorkerResources) -> list[Callable[..., Any]]:
    endpoints = resources.endpoints()
    return [
        endpoints.ensure_endpoint_replicas,
        endpoints.wait_endpoint_ready,
        endpoints.observe_endpoint,
        endpoints.delete_endpoint_replicas,
        *_system(resources),
    ]


def _cluster(resources: WorkerResources) -> list[Callable[..., Any]]:
    clusters = resources.clusters()
    return [
        clusters.validate_cluster_credential,
        clusters.connect_cluster,
        clusters.discover_cluster,
        clusters.prepare_cluster,
        clusters.smoke_check_cluster,
        clusters.check_cluster_health,
        clusters.teardown_cluster,
        *_system(resources),
    ]


POOLS: dict[Queue, PoolSpec] = {
    Queue.ORCHESTRATION: PoolSpec(
        Queue.ORCHESTRATION,
        workflows=[
            DiagnoseSystem,
            OnboardCluster,
            MonitorCluster,
            DeleteCluster,
            OnboardModel,
            RescanModels,
            SyncCloudModels,
            DeployEndpoint,
        ],
        activities=_orchestration,
        description="all workflows; DB bookkeeping activities",
    ),
    Queue.CLUSTER: PoolSpec(
        Queue.CLUSTER, activities=_cluster, description="cluster connect/discover/health"
    ),
    Queue.MODEL: PoolSpec(
        Queue.MODEL,
        activities=_model,
        max_concurrent_activities=4,
        description="download, hash, scan, license, metadata",
    ),
    Queue.DEPLOY: PoolSpec(
        Queue.DEPLOY, activities=_deploy, description="replicas and readiness probes"
    ),
    Queue.BENCHMARK: PoolSpec(
        Queue.BENCHMARK,
        activities=_system,
        max_concurrent_activities=2,
        description="load generation, one run per worker",
    ),
    Queue.SYNC: PoolSpec(Queue.SYNC, activities=_sync, description="cloud catalog sync"),
}
