"""Payloads of endpoints: what a replica runs (`LaunchSpec`), the replica set a provider
keeps running (`ReplicaSetSpec`), what it reports back (`ReplicaInfo`), and the messages
of the `DeployEndpoint` workflow.

A launch spec is provider-neutral: its command may hold placeholders the provider fills
in (`{port}`: the port the replica listens on; `{python}`: the interpreter of the
worker that starts a local replica; `{model_dir}`: where the model's files were put on
the replica's disk).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, Field, model_validator

from workflows.contracts.autoscale import AutoscalePolicy, AutoscaleState
from workflows.contracts.clusters import ClusterTarget
from workflows.contracts.common import Integer

PORT_PLACEHOLDER = "{port}"
PYTHON_PLACEHOLDER = "{python}"
MODEL_DIR_PLACEHOLDER = "{model_dir}"

# Labels every provider object of an endpoint carries (Kubernetes labels, local state).
LABEL_ENDPOINT = "cp/endpoint"
LABEL_REPLICA = "cp/replica"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "control-plane"

# Failure types raised as non-retryable `ApplicationError`s by endpoint activities.
ENDPOINT_GONE = "EndpointGone"
INVALID_ENDPOINT = "InvalidEndpoint"
MODEL_NOT_DEPLOYABLE = "ModelNotDeployable"
NO_PLACEMENT = "NoPlacement"
REPLICA_FAILED = "ReplicaFailed"
ENDPOINT_NON_RETRYABLE = [
    ENDPOINT_GONE,
    INVALID_ENDPOINT,
    MODEL_NOT_DEPLOYABLE,
    NO_PLACEMENT,
    REPLICA_FAILED,
]

SCALE_SIGNAL = "scale"
WAKE_SIGNAL = "wake"
SET_AUTOSCALE_UPDATE = "set_autoscale"
DELETE_UPDATE = "delete"
STATE_QUERY = "state"


def endpoint_workflow_id(endpoint_id: uuid.UUID) -> str:
    return f"endpoint-{endpoint_id}"


def replica_set_name(endpoint_id: uuid.UUID) -> str:
    """The deterministic name of an endpoint's replica set on any provider (the
    Kubernetes Deployment and Service, the local state directory)."""
    return f"cp-ep-{endpoint_id.hex[:12]}"


class EngineKind(StrEnum):
    SIMULATOR = "simulator"
    EMBEDDINGS = "embeddings"
    VLLM = "vllm"
    TRANSFORMERS = "transformers"


class EndpointStatus(StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"
    # Autoscaled (or manually scaled) to zero replicas; a `wake` brings it back.
    IDLE = "idle"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


class ReplicaState(StrEnum):
    # Process/pod exists, health not answering yet.
    STARTING = "starting"
    READY = "ready"
    # Was ready, health now failing (or the pod is not ready).
    UNHEALTHY = "unhealthy"
    # The process exited / the pod failed: it must be replaced.
    EXITED = "exited"


class Resources(BaseModel):
    """What one replica asks of its node."""

    cpu: float = Field(default=1.0, gt=0, le=1024)
    memory_mb: Integer = Field(default=1024, ge=16, le=16_777_216)
    gpus: Integer = Field(default=0, ge=0, le=64)
    # The extended resource GPUs are requested as on Kubernetes.
    gpu_resource: str = "nvidia.com/gpu"


# A Kubernetes object name (RFC 1123 subdomain) and a Secret's key.
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]{1,253}$"


class SecretEnv(BaseModel):
    """An environment variable read from an existing Secret in the cluster's namespace
    (Kubernetes only): its value never passes through the control plane."""

    secret: str = Field(pattern=K8S_NAME_PATTERN, max_length=253)
    key: str = Field(pattern=SECRET_KEY_PATTERN)


class CacheVolume(BaseModel):
    """An existing PersistentVolumeClaim mounted into every replica (Kubernetes only),
    e.g. a shared model download cache that survives pod restarts."""

    claim: str = Field(pattern=K8S_NAME_PATTERN, max_length=253)
    mount_path: str = Field(pattern=r"^/[^\x00-\x1f]*$", max_length=1024)


class ArtifactFile(BaseModel):
    """One stored model file a replica needs on its disk."""

    path: str
    object_key: str
    sha256: str
    size: int


class ModelFiles(BaseModel):
    """The files of a model, put under `{model_dir}` before a local replica starts."""

    model_id: uuid.UUID
    files: list[ArtifactFile] = Field(default_factory=list)


class LaunchSpec(BaseModel):
    engine: EngineKind
    served_model_name: str
    # Argument vector (never a shell), placeholders as in the module docstring.
    command: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    # Kubernetes only: env vars from Secrets, and a claim to mount (see their classes).
    secret_env: dict[str, SecretEnv] = Field(default_factory=dict)
    cache_volume: CacheVolume | None = None
    # The port inside the container (Kubernetes); local replicas get a free port.
    port: Integer = 8000
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    # Kubernetes only: the container image.
    image: str | None = None
    resources: Resources = Field(default_factory=Resources)
    model_files: ModelFiles | None = None
    # How long a replica may take from start to healthy before it counts as failed.
    startup_timeout_s: float = Field(default=300.0, gt=0)
    # A request proving the engine serves, not only that it is up: (path, JSON body).
    probe_path: str | None = None
    probe_body: dict[str, object] | None = None

    @model_validator(mode="after")
    def _env_names_once(self) -> Self:
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"{', '.join(both)} set both as a value and from a Secret")
        return self


class ReplicaSetSpec(BaseModel):
    endpoint_id: uuid.UUID
    # `replica_set_name(endpoint_id)`.
    name: str
    launch: LaunchSpec
    replicas: Integer = Field(ge=0)
    labels: dict[str, str] = Field(default_factory=dict)


class ReplicaInfo(BaseModel):
    # Stable per replica: `<set name>-<index>` locally, the pod name on Kubernetes.
    name: str
    state: ReplicaState
    # Base URL of the replica's server (no trailing slash), when it has one.
    url: str | None = None
    index: Integer | None = None
    pid: int | None = None
    port: int | None = None
    node: str | None = None
    started_at: datetime | None = None
    restarts: Integer = 0
    reason: str = ""


class ReplicaLoad(BaseModel):
    """One replica's `/metrics`, reduced to what autoscaling reads."""

    name: str
    running: float = 0.0
    waiting: float = 0.0
    ok: bool = True
    error: str = ""


class EndpointTarget(BaseModel):
    """Everything activities need to reach an endpoint's replicas (no secrets)."""

    endpoint_id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    cluster_id: uuid.UUID | None = None


class DeployEndpointRequest(BaseModel):
    target: EndpointTarget
    # Replicas to start with (autoscaling takes over once the endpoint runs).
    initial_replicas: Integer = Field(default=1, ge=0)
    autoscale: AutoscalePolicy = Field(default_factory=AutoscalePolicy)
    # How often the workflow compares desired and actual replicas and samples load.
    reconcile_interval_s: float = Field(default=10.0, ge=0.2, le=3600)
    # Loop iterations per run before continuing as new (sooner when Temporal suggests).
    max_iterations: Integer = Field(default=500, ge=1)
    # Carried across continue-as-new; empty on the first run.
    carried: EndpointLoopState | None = None


class ScalingEventRecord(BaseModel):
    time: datetime
    from_replicas: Integer
    to_replicas: Integer
    reason: str
    metric: float = 0.0
    # autoscale | manual | wake | reconcile
    trigger: str = "autoscale"


class EndpointLoopState(BaseModel):
    """All the state `DeployEndpoint` carries from one run to the next."""

    spec: ReplicaSetSpec | None = None
    cluster: ClusterTarget | None = None
    cluster_id: uuid.UUID | None = None
    autoscale: AutoscalePolicy = Field(default_factory=AutoscalePolicy)
    autoscale_state: AutoscaleState = Field(default_factory=AutoscaleState)
    replicas: Integer = 0
    status: EndpointStatus = EndpointStatus.DEPLOYING
    published: bool = False
    wake_pending: bool = False
    recreated_total: Integer = 0
    iterations: Integer = 0


class ScaleRequest(BaseModel):
    """`scale` signal: pin the replica count (None clears the pin)."""

    replicas: Integer | None = Field(default=None, ge=0)


class DeleteEndpointRequest(BaseModel):
    # How long to let in-flight requests finish after unpublishing.
    grace_s: float = Field(default=10.0, ge=0, le=3600)


class EndpointStateView(BaseModel):
    """The `state` query."""

    status: EndpointStatus
    replicas_desired: Integer
    replicas: list[ReplicaInfo] = Field(default_factory=list)
    autoscale: AutoscalePolicy
    manual_replicas: Integer | None = None
    last_decision: str = ""
    load: float = 0.0
    published: bool = False
    recreated_total: Integer = 0
    cluster_id: uuid.UUID | None = None


class DeployEndpointResult(BaseModel):
    status: EndpointStatus
    reason: str = ""


class PreparedEndpoint(BaseModel):
    """What `prepare_endpoint` decided: where the endpoint runs and what replicas run."""

    cluster: ClusterTarget
    spec: ReplicaSetSpec
    placement: str = ""


class ReplicaCall(BaseModel):
    """A provider call on one endpoint's replica set."""

    cluster: ClusterTarget
    spec: ReplicaSetSpec


class Observation(BaseModel):
    replicas: list[ReplicaInfo] = Field(default_factory=list)
    loads: list[ReplicaLoad] = Field(default_factory=list)

    @property
    def running(self) -> float:
        return sum(load.running for load in self.loads)

    @property
    def waiting(self) -> float:
        return sum(load.waiting for load in self.loads)


class EndpointSnapshot(BaseModel):
    """What `save_endpoint_state` mirrors into PostgreSQL."""

    endpoint_id: uuid.UUID
    status: EndpointStatus
    reason: str = ""
    replicas_desired: Integer = 0
    # None: leave the replica rows as they are.
    replicas: list[ReplicaInfo] | None = None
    loads: dict[str, float] = Field(default_factory=dict)
    load: float = 0.0
    published: bool = False
    autoscale: AutoscalePolicy | None = None
    manual_replicas: Integer | None = None
    events: list[ScalingEventRecord] = Field(default_factory=list)
    # Do not overwrite these statuses (a delete that started meanwhile).
    unless_in: list[EndpointStatus] = Field(default_factory=list)


DeployEndpointRequest.model_rebuild()
