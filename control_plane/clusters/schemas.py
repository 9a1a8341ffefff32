"""Request and response bodies of the clusters API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from control_plane.clusters.placement import Recommendation
from control_plane.core.pagination import Page
from workflows.contracts.clusters import ClusterKind, ClusterStatus, MonitorSettings

# A DNS label: it names Kubernetes objects derived from the cluster.
ClusterName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
]
Namespace = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
]


class LocalClusterCreate(BaseModel):
    """The machine the control plane's workers run on."""

    model_config = ConfigDict(extra="forbid")

    name: ClusterName
    kind: Literal[ClusterKind.LOCAL]
    settings: MonitorSettings = Field(default_factory=MonitorSettings)


class KubernetesClusterCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ClusterName
    kind: Literal[ClusterKind.KUBERNETES]
    credential_id: uuid.UUID | None = Field(
        default=None,
        description="A tenant-wide `kubeconfig` credential. Leave empty when the control "
        "plane runs inside the cluster (in-cluster service account).",
    )
    namespace: Namespace | None = Field(
        default=None,
        description="Namespace the control plane creates and works in "
        "(default `cp-<cluster id prefix>`).",
    )
    settings: MonitorSettings = Field(default_factory=MonitorSettings)


ClusterCreate = Annotated[LocalClusterCreate | KubernetesClusterCreate, Field(discriminator="kind")]


class AcceleratorRead(BaseModel):
    vendor: str
    model: str
    memory_mb: int
    count: int
    allocatable: int
    driver_version: str | None
    cuda_version: str | None


class NodeRead(BaseModel):
    id: uuid.UUID
    name: str
    status: str
    reason: str
    cpu_cores: float
    allocatable_cpu: float
    memory_mb: int
    allocatable_memory_mb: int
    labels: dict[str, str]
    last_seen_at: datetime | None
    accelerators: list[AcceleratorRead] = Field(default_factory=list)


class Capacity(BaseModel):
    nodes: int
    ready_nodes: int
    cpu_cores: float
    allocatable_cpu: float
    memory_mb: int
    allocatable_memory_mb: int
    gpus: int
    allocatable_gpus: int
    gpu_memory_mb: int


class StatusEvent(BaseModel):
    status: ClusterStatus
    previous_status: ClusterStatus | None
    reason: str
    at: datetime


class ClusterRead(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    kind: ClusterKind
    credential_id: uuid.UUID | None
    server_url: str
    namespace: str
    status: ClusterStatus
    status_reason: str
    last_seen_at: datetime | None
    platform: str | None
    version: str | None
    settings: MonitorSettings
    capacity: Capacity
    created_at: datetime
    updated_at: datetime
    # The workflow that is working on the cluster now (onboarding, monitor or delete).
    workflow_id: str | None = None

    @classmethod
    def of(cls, row: Any, *, workflow_id: str | None = None) -> ClusterRead:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            kind=row.kind,
            credential_id=row.credential_id,
            server_url=row.server_url,
            namespace=row.namespace,
            status=row.status,
            status_reason=row.status_reason,
            last_seen_at=row.last_seen_at,
            platform=row.platform,
            version=row.version,
            settings=MonitorSettings.model_validate(row.settings),
            capacity=Capacity(
                nodes=row.node_count,
                ready_nodes=row.ready_node_count,
                cpu_cores=row.cpu_cores,
                allocatable_cpu=row.allocatable_cpu,
                memory_mb=row.memory_mb,
                allocatable_memory_mb=row.allocatable_memory_mb,
                gpus=row.gpu_count,
                allocatable_gpus=row.allocatable_gpus,
                gpu_memory_mb=row.gpu_memory_mb,
            ),
            created_at=row.created_at,
            updated_at=row.updated_at,
            workflow_id=workflow_id,
        )


class ClusterDetail(ClusterRead):
    nodes: list[NodeRead] = Field(default_factory=list)
    history: list[StatusEvent] = Field(default_factory=list)


ClusterList = Page[ClusterRead]


class RecommendationList(BaseModel):
    memory_mb: int
    replicas: int
    device: str
    items: list[Recommendation]
