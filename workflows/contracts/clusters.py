"""Payloads of the cluster workflows (`OnboardCluster`, `MonitorCluster`, `DeleteCluster`)
and of the provider activities they call.

Workflows carry ids (cluster, tenant, credential), never secrets: the activities reveal
the credential just before they talk to the cluster.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from workflows.contracts.common import Integer

# Failure types the provider activities raise as non-retryable `ApplicationError`s.
INVALID_CREDENTIAL = "InvalidClusterCredential"
AUTH_FAILED = "ClusterAuthFailed"
CLUSTER_GONE = "ClusterGone"
NON_RETRYABLE = [INVALID_CREDENTIAL, AUTH_FAILED, CLUSTER_GONE]

REFRESH_SIGNAL = "refresh"
STOP_SIGNAL = "stop"


class ClusterKind(StrEnum):
    LOCAL = "local"
    KUBERNETES = "kubernetes"


class ClusterStatus(StrEnum):
    ONBOARDING = "onboarding"
    AVAILABLE = "available"
    DEGRADED = "degraded"
    UNREACHABLE = "unreachable"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


class Platform(StrEnum):
    LOCAL = "local"
    KUBERNETES = "kubernetes"
    OPENSHIFT = "openshift"


class MonitorSettings(BaseModel):
    """How a cluster is watched once onboarded (part of the cluster's settings)."""

    interval_seconds: Integer = Field(default=60, ge=5, le=86_400)
    # Consecutive failed checks before the cluster is marked `unreachable`.
    failure_threshold: Integer = Field(default=3, ge=1, le=100)
    # Attempts to reach the cluster while onboarding (exponential back-off between them).
    connect_attempts: Integer = Field(default=5, ge=1, le=50)


class ClusterTarget(BaseModel):
    """Everything an activity needs to reach one cluster (secrets by reference)."""

    cluster_id: uuid.UUID
    tenant_id: uuid.UUID
    kind: ClusterKind
    credential_id: uuid.UUID | None = None
    # Kubernetes: the namespace (and service account) the control plane works in.
    namespace: str = "control-plane"


class ConnectionInfo(BaseModel):
    server_url: str
    platform: Platform
    version: str


class AcceleratorInfo(BaseModel):
    vendor: str
    model: str
    # Per device; 0 when the cluster does not say.
    memory_mb: int = 0
    count: int
    allocatable: int
    driver_version: str | None = None
    cuda_version: str | None = None


class NodeInfo(BaseModel):
    name: str
    ready: bool
    # Why the node is not ready (conditions, taints), empty when it is.
    reason: str = ""
    cpu_cores: float
    memory_mb: int
    allocatable_cpu: float
    allocatable_memory_mb: int
    labels: dict[str, str] = Field(default_factory=dict)
    accelerators: list[AcceleratorInfo] = Field(default_factory=list)


class Inventory(BaseModel):
    connection: ConnectionInfo
    nodes: list[NodeInfo] = Field(default_factory=list)


class PrepareResult(BaseModel):
    # What onboarding created (empty when everything already existed or, for `local`,
    # there is nothing to create).
    created: list[str] = Field(default_factory=list)
    detail: str = ""


class HealthReport(BaseModel):
    reachable: bool
    reason: str = ""
    inventory: Inventory | None = None
    checked_at: datetime


class OnboardClusterRequest(BaseModel):
    cluster: ClusterTarget
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)


class OnboardClusterResult(BaseModel):
    status: ClusterStatus
    reason: str = ""
    monitor_workflow_id: str | None = None


class MonitorClusterRequest(BaseModel):
    cluster: ClusterTarget
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    # Carried across continue-as-new.
    status: ClusterStatus = ClusterStatus.AVAILABLE
    consecutive_failures: int = 0
    checks: int = 0
    # Checks per run before continue-as-new keeps the history bounded.
    checks_per_run: Integer = Field(default=200, ge=1)


class MonitorClusterResult(BaseModel):
    checks: int
    status: ClusterStatus


class DeleteClusterRequest(BaseModel):
    cluster: ClusterTarget
    force: bool = False


class DeleteClusterResult(BaseModel):
    removed: list[str] = Field(default_factory=list)


class StatusChange(BaseModel):
    cluster_id: uuid.UUID
    status: ClusterStatus
    reason: str = ""
    # Only when this status is the one currently stored (guards late writes, e.g. a
    # monitor check that lands after a delete began).
    unless_in: list[ClusterStatus] = Field(default_factory=list)


class SaveInventory(BaseModel):
    cluster_id: uuid.UUID
    inventory: Inventory
    status: ClusterStatus
    reason: str = ""
    unless_in: list[ClusterStatus] = Field(default_factory=list)


def onboard_workflow_id(cluster_id: uuid.UUID) -> str:
    return f"cluster-onboard-{cluster_id}"


def monitor_workflow_id(cluster_id: uuid.UUID) -> str:
    return f"cluster-monitor-{cluster_id}"


def delete_workflow_id(cluster_id: uuid.UUID) -> str:
    return f"cluster-delete-{cluster_id}"


def namespace_for(cluster_id: uuid.UUID) -> str:
    """The control plane's namespace on a Kubernetes cluster: derived from the id, so a
    retried onboarding finds what an earlier attempt created."""
    return f"cp-{cluster_id.hex[:12]}"
