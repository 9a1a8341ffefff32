"""The Kubernetes (and OpenShift) cluster provider, on the official `kubernetes` client.

One provider talks to one cluster through a private `ApiClient` built from its own
`Configuration`; the process-wide default configuration is never read or written, so
providers for different clusters cannot leak credentials into each other.

The client is synchronous: every call runs in `asyncio.to_thread` with a per-request
timeout. urllib3's own retries are off, so an unreachable server fails on the first
attempt; the caller (a Temporal activity with its retry policy) owns retrying.

Errors map onto the provider errors of `base`:

- 401/403 -> `ClusterAuthError` (permanent);
- 5xx, 429, connection errors, timeouts, TLS failures -> `ClusterUnreachable` (transient);
- a kubeconfig that cannot describe a cluster -> `InvalidClusterConfig` (permanent);
- any other answer the server refuses (400, 404, 405, 422...), or an answer that is not a
  Kubernetes object at all -> plain `ProviderError`: neither a transport problem nor a
  credential one; the message carries the server's `Status` message.

Kubeconfigs are tenant-supplied documents, so only self-contained credentials are
accepted: a bearer token, inline client certificate/key data, or username/password.
`exec` and `auth-provider` users (which would run commands or use the control plane's own
cloud identity) and file references (`tokenFile`, `client-certificate`,
`certificate-authority`..., which would read files of the control plane's host) are
refused with `InvalidClusterConfig`.

Replica sets (`ReplicaProvider`) are a Deployment and a ClusterIP Service, both named
`ReplicaSetSpec.name`, in the provider's namespace (`replica_set_manifests` renders them).
Ensuring creates them or, when they exist, merge-patches their replica count and pod
template, so a repeated call changes nothing and an unchanged template starts no rollout.
Each pod is one replica. A spec the cluster cannot run (no image, files only a local
replica has) is refused with `InvalidReplicaSpec`.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import math
import re
import ssl
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import urllib3.exceptions
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.utils import parse_quantity

from control_plane.clusters.providers.base import (
    ClusterAuthError,
    ClusterUnreachable,
    InvalidClusterConfig,
    ProviderError,
    ReplicaNotFound,
)
from workflows.contracts.clusters import (
    AcceleratorInfo,
    ClusterKind,
    ConnectionInfo,
    Inventory,
    NodeInfo,
    Platform,
    PrepareResult,
)
from workflows.contracts.endpoints import (
    LABEL_ENDPOINT,
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    PYTHON_PLACEHOLDER,
    ReplicaInfo,
    ReplicaSetSpec,
    ReplicaState,
)

SERVICE_ACCOUNT = "control-plane"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "control-plane"
CLUSTER_LABEL = "cp/cluster"

NVIDIA_GPU = "nvidia.com/gpu"
AMD_GPU = "amd.com/gpu"

# Statuses that `_call` turns into None for the operations that expect them.
_EXISTS = frozenset({409})
_MISSING = frozenset({404})

_MIB = Decimal(1024 * 1024)
# RFC 1123 label: what Kubernetes accepts as a namespace name.
_NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Status messages can quote whole objects; keep error messages readable.
_MAX_MESSAGE = 300

# Kubeconfig keys that would make the loader run programs or use the control plane's own
# identity: a tenant's document must not do either on our host.
_REFUSED_PLUGINS = {"exec": "a credential plugin (exec)", "auth-provider": "an auth-provider"}
# Keys that read files of the control plane's host, and the inline key the loader prefers
# to them when both are present.
_FILE_KEYS = {
    "tokenFile": "token",
    "client-certificate": "client-certificate-data",
    "client-key": "client-key-data",
    "certificate-authority": "certificate-authority-data",
}


APP_NAME_LABEL = "app.kubernetes.io/name"
ENGINE_CONTAINER = "engine"
SERVICE_PORT = 80
_SHM_VOLUME = "dshm"
_CACHE_VOLUME = "model-cache"
# Kubernetes sends JSON merge patches (RFC 7386) with this type: lists are replaced
# whole, so a patched pod template loses containers, env vars and volumes it no longer has.
_MERGE_PATCH = "application/merge-patch+json"
# Period of the startup probe; its failure threshold covers `startup_timeout_s`.
_STARTUP_PERIOD_S = 10
# Bounds what one `replica_logs` call holds in memory per replica.
_MAX_LOG_BYTES = 1024 * 1024
# Container waiting reasons that mean the replica has failed, not that it is on its way.
_FAILED_WAITING = frozenset({"CrashLoopBackOff"})


class InvalidReplicaSpec(ProviderError):
    """A replica set spec this provider cannot run (permanent: retrying will not help)."""


def _load_document(kubeconfig: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(kubeconfig)
    except (yaml.YAMLError, RecursionError):
        # The parser's message quotes the offending line, which may hold a token or key.
        raise InvalidClusterConfig("the kubeconfig is not valid YAML") from None
    if not isinstance(document, dict):
        raise InvalidClusterConfig("the kubeconfig is not a YAML mapping")
    return document


def _named(document: Mapping[str, Any], section: str, name: str) -> dict[str, Any] | None:
    entries = document.get(section)
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def _active_context(document: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The current context's name and body, or the only context's when none is current."""
    contexts = document.get("contexts")
    if not isinstance(contexts, list) or not contexts:
        raise InvalidClusterConfig("the kubeconfig has no contexts")
    current = document.get("current-context")
    if current:
        entry = _named(document, "contexts", str(current))
        if entry is None:
            raise InvalidClusterConfig(
                f"the kubeconfig's current-context {current!r} is not defined"
            )
    elif len(contexts) == 1 and isinstance(contexts[0], dict):
        entry = contexts[0]
    else:
        raise InvalidClusterConfig(
            f"the kubeconfig has {len(contexts)} contexts and no current-context"
        )
    name = entry.get("name")
    body = entry.get("context")
    if not isinstance(name, str) or not name or not isinstance(body, dict):
        raise InvalidClusterConfig("the kubeconfig's context has no name or no context section")
    return name, body


def _active_cluster(document: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(context name, cluster section, server URL) of the context in use."""
    context_name, context = _active_context(document)
    cluster_name = context.get("cluster")
    if not isinstance(cluster_name, str) or not cluster_name:
        raise InvalidClusterConfig(f"context {context_name!r} names no cluster")
    entry = _named(document, "clusters", cluster_name)
    if entry is None or not isinstance(entry.get("cluster"), dict):
        raise InvalidClusterConfig(
            f"context {context_name!r} points at cluster {cluster_name!r}, "
            "which the kubeconfig does not define"
        )
    cluster: dict[str, Any] = entry["cluster"]
    server = cluster.get("server")
    if not isinstance(server, str) or not server.strip():
        raise InvalidClusterConfig(f"cluster {cluster_name!r} has no server URL")
    server = server.strip().rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise InvalidClusterConfig(f"cluster {cluster_name!r} has a server URL that is not http(s)")
    return context_name, cluster, server


def server_url_of(kubeconfig: str) -> str:
    """The API server URL of the kubeconfig's current context (or of its only context)."""
    return _active_cluster(_load_document(kubeconfig))[2]


def _refuse_host_references(document: Mapping[str, Any]) -> None:
    """Refuse kubeconfigs whose active context would run programs or read local files."""
    context_name, context = _active_context(document)
    cluster_name = str(context.get("cluster"))
    cluster = (_named(document, "clusters", cluster_name) or {}).get("cluster") or {}
    sections: list[tuple[str, Mapping[str, Any]]] = [(f"cluster {cluster_name!r}", cluster)]
    user_name = context.get("user")
    if user_name:
        user = (_named(document, "users", str(user_name)) or {}).get("user")
        if not isinstance(user, dict):
            raise InvalidClusterConfig(
                f"context {context_name!r} points at user {user_name!r}, "
                "which the kubeconfig does not define"
            )
        for key, plugin in _REFUSED_PLUGINS.items():
            if key in user:
                raise InvalidClusterConfig(
                    f"user {user_name!r} uses {plugin}, which is not supported: "
                    "give a token or inline client certificate data"
                )
        sections.append((f"user {user_name!r}", user))
    for owner, section in sections:
        for key, inline in _FILE_KEYS.items():
            if key in section and not section.get(inline):
                raise InvalidClusterConfig(
                    f"{owner} refers to a local file ({key}), which is not supported: "
                    f"inline it as {inline}"
                )


def _check_tls_material(configuration: Any) -> None:
    """Fail now, not at the first request, when the kubeconfig's certificates are unusable."""
    if not str(configuration.host).startswith("https://"):
        return
    try:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    except (ssl.SSLError, OSError, ValueError):
        raise InvalidClusterConfig(
            "the kubeconfig's certificate-authority-data is not a PEM certificate"
        ) from None
    if configuration.cert_file or configuration.key_file:
        if not (configuration.cert_file and configuration.key_file):
            raise InvalidClusterConfig(
                "the kubeconfig has client certificate data without its key, or a key alone"
            )
        try:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        except (ssl.SSLError, OSError, ValueError):
            raise InvalidClusterConfig(
                "the kubeconfig's client-certificate-data/client-key-data are not a PEM "
                "certificate and its matching key"
            ) from None


def _send_bearer_token(configuration: Any) -> None:
    """Make the token the loaders stored actually go out with each request.

    kubernetes 36.0.0's loaders store the token under `api_key["authorization"]` while its
    generated client only sends `api_key["BearerToken"]` (kubernetes-client/python#2582,
    fixed in 36.0.1), so every request would go out anonymous. Moving the token across,
    also after the loaders' refresh hook has re-read a rotated token, works on both.
    """
    loader_hook = configuration.refresh_api_key_hook

    def move_token(config: Any) -> None:
        token = config.api_key.pop("authorization", None)
        if token is not None:
            config.api_key["BearerToken"] = token

    def refresh_then_move(config: Any) -> None:
        loader_hook(config)
        move_token(config)

    move_token(configuration)
    if loader_hook is not None:
        configuration.refresh_api_key_hook = refresh_then_move


def _status_message(exc: Any) -> str:
    """The `message` of the Kubernetes `Status` the server answered with, if any."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        return ""
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes, bounded in case a chain loops."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return
        yield current
        current = current.__cause__ or current.__context__


def _transport_reason(exc: BaseException, timeout: float) -> str:
    """A short, secret-free description of why a request never got an answer."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return "cannot resolve the host name"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        for cause in _chain(exc):
            if isinstance(cause, OSError) and cause.strerror:
                return cause.strerror.lower()
        return "cannot open a connection"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return f"connection timed out after {timeout:g} s"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "the connection was dropped before an answer"
    if isinstance(exc, urllib3.exceptions.SSLError | ssl.SSLError):
        for cause in _chain(exc):
            if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
                return f"TLS handshake failed: certificate verify failed ({cause.verify_message})"
        return "TLS handshake failed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _quantity(value: object) -> Decimal:
    """A Kubernetes quantity ("3500m", "16Gi", "16384Ki"); 0 when absent or malformed, so one
    odd node cannot fail a whole inventory."""
    if value is None:
        return Decimal(0)
    try:
        result: Decimal = parse_quantity(value)
    except (ValueError, TypeError, InvalidOperation):
        return Decimal(0)
    return result


def _cores(value: object) -> float:
    return float(_quantity(value))


def _mib(value: object) -> int:
    return int(_quantity(value) / _MIB)


def _count(value: object) -> int:
    return int(_quantity(value))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")
_SIZE_IN_MIB = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def _size_mib(value: str | None) -> int:
    """Device memory written by GPU labellers: "81920" (MiB), "64G", "192Gi", "64GB".

    Device memory sizes are powers of two, so G means GiB whatever the spelling; a bare
    number is MiB, as NVIDIA GPU feature discovery writes it.
    """
    if not value:
        return 0
    match = _SIZE.match(value)
    if match is None:
        return 0
    return int(float(match.group(1)) * _SIZE_IN_MIB[match.group(2).lower()])


def _dotted(labels: Mapping[str, str], full: str, *parts: str) -> str | None:
    if labels.get(full):
        return labels[full]
    values = [labels.get(part) for part in parts]
    if not values[0]:
        return None
    return ".".join(v for v in values if v)


def _accelerators(
    capacity: Mapping[str, str], allocatable: Mapping[str, str], labels: Mapping[str, str]
) -> list[AcceleratorInfo]:
    found: list[AcceleratorInfo] = []
    nvidia = _count(capacity.get(NVIDIA_GPU))
    if nvidia > 0:
        found.append(
            AcceleratorInfo(
                vendor="nvidia",
                model=labels.get("nvidia.com/gpu.product") or "unknown",
                memory_mb=_size_mib(labels.get("nvidia.com/gpu.memory")),
                count=nvidia,
                allocatable=_count(allocatable.get(NVIDIA_GPU)),
                driver_version=_dotted(
                    labels,
                    "nvidia.com/cuda.driver-version.full",
                    "nvidia.com/cuda.driver.major",
                    "nvidia.com/cuda.driver.minor",
                    "nvidia.com/cuda.driver.rev",
                ),
                cuda_version=_dotted(
                    labels,
                    "nvidia.com/cuda.runtime-version.full",
                    "nvidia.com/cuda.runtime.major",
                    "nvidia.com/cuda.runtime.minor",
                ),
            )
        )
    amd = _count(capacity.get(AMD_GPU))
    if amd > 0:
        found.append(
            AcceleratorInfo(
                vendor="amd",
                model=labels.get("amd.com/gpu.product-name") or "unknown",
                memory_mb=_size_mib(labels.get("amd.com/gpu.vram")),
                count=amd,
                allocatable=_count(allocatable.get(AMD_GPU)),
                driver_version=labels.get("amd.com/gpu.driver-version") or None,
            )
        )
    return found


def _readiness(node: Any) -> tuple[bool, str]:
    reasons: list[str] = []
    if node.spec is not None and node.spec.unschedulable:
        reasons.append("cordoned")
    conditions = (node.status.conditions if node.status is not None else None) or []
    ready = next((c for c in conditions if c.type == "Ready"), None)
    if ready is None:
        reasons.append("no Ready condition reported")
    elif ready.status != "True":
        detail = " ".join(part for part in (ready.reason, ready.message) if part)
        reasons.append(f"Ready={ready.status}: {detail}" if detail else f"Ready={ready.status}")
    return not reasons, "; ".join(reasons)


def _node_info(node: Any) -> NodeInfo:
    status = node.status
    capacity: dict[str, str] = dict((status.capacity if status is not None else None) or {})
    allocatable: dict[str, str] = dict((status.allocatable if status is not None else None) or {})
    labels = {str(k): str(v) for k, v in (node.metadata.labels or {}).items()}
    ready, reason = _readiness(node)
    return NodeInfo(
        name=str(node.metadata.name),
        ready=ready,
        reason=reason,
        cpu_cores=_cores(capacity.get("cpu")),
        memory_mb=_mib(capacity.get("memory")),
        allocatable_cpu=_cores(allocatable.get("cpu")),
        allocatable_memory_mb=_mib(allocatable.get("memory")),
        labels=labels,
        accelerators=_accelerators(capacity, allocatable, labels),
    )


def _replica_set_labels(spec: ReplicaSetSpec) -> dict[str, str]:
    # Ours last: a spec's own labels must not break the selector or the ownership marks.
    return {
        **spec.labels,
        LABEL_ENDPOINT: str(spec.endpoint_id),
        MANAGED_BY_LABEL: MANAGED_BY,
        APP_NAME_LABEL: spec.name,
    }


def _container_command(spec: ReplicaSetSpec) -> list[str]:
    launch = spec.launch
    command: list[str] = []
    for arg in launch.command:
        if MODEL_DIR_PLACEHOLDER in arg:
            raise InvalidReplicaSpec(
                f"replica set {spec.name}: the command refers to {MODEL_DIR_PLACEHOLDER}, model "
                "files put on a local replica's disk, which pods on Kubernetes do not have"
            )
        command.append(
            arg.replace(PORT_PLACEHOLDER, str(launch.port)).replace(PYTHON_PLACEHOLDER, "python")
        )
    return command


def _millicores(cpu: float) -> str:
    return f"{max(1, round(cpu * 1000))}m"


def replica_set_manifests(
    spec: ReplicaSetSpec, namespace: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment and the Service of a replica set, as the API server takes them.

    Pure: the same spec gives the same manifests. Refuses (`InvalidReplicaSpec`) a spec
    without an image or whose command needs a local replica's model files; the launch
    spec's `model_files` are otherwise ignored (the engine fetches its model itself).
    """
    launch = spec.launch
    if not launch.image:
        raise InvalidReplicaSpec(
            f"replica set {spec.name}: the launch spec has no container image, which "
            "replicas on Kubernetes need"
        )
    command = _container_command(spec)
    labels = _replica_set_labels(spec)
    selector = {LABEL_ENDPOINT: str(spec.endpoint_id)}
    resources = launch.resources
    requests = {"cpu": _millicores(resources.cpu), "memory": f"{resources.memory_mb}Mi"}
    limits = dict(requests)
    if resources.gpus > 0:
        limits[resources.gpu_resource] = str(resources.gpus)
    health = {"path": launch.health_path, "port": launch.port, "scheme": "HTTP"}
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": launch.image,
        "command": command,
        "env": [{"name": key, "value": launch.env[key]} for key in sorted(launch.env)]
        + [
            {
                "name": key,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": launch.secret_env[key].secret,
                        "key": launch.secret_env[key].key,
                    }
                },
            }
            for key in sorted(launch.secret_env)
        ],
        "ports": [{"name": "http", "containerPort": launch.port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        # Liveness and readiness wait for the startup probe, which allows the whole
        # startup timeout (image pull aside: a pod pulling its image is not started yet).
        "startupProbe": {
            "httpGet": health,
            "periodSeconds": _STARTUP_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": max(1, math.ceil(launch.startup_timeout_s / _STARTUP_PERIOD_S)),
        },
        "readinessProbe": {
            "httpGet": health,
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": health,
            "periodSeconds": 10,
            "timeoutSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [],
    }
    # Always present, even empty: a merge patch replaces lists but leaves absent keys
    # alone, so a template that no longer needs a volume must say so.
    volumes: list[dict[str, Any]] = []
    if resources.gpus > 0:
        # The container runtime's 64 MiB /dev/shm is too small for PyTorch and NCCL, which
        # GPU engines (vLLM) pass tensors between processes through.
        volumes.append({"name": _SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"].append({"name": _SHM_VOLUME, "mountPath": "/dev/shm"})
    if launch.cache_volume is not None:
        volumes.append(
            {
                "name": _CACHE_VOLUME,
                "persistentVolumeClaim": {"claimName": launch.cache_volume.claim},
            }
        )
        container["volumeMounts"].append(
            {"name": _CACHE_VOLUME, "mountPath": launch.cache_volume.mount_path}
        )
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            # Start the new replica before stopping an old one, so a rollout never lowers
            # the serving capacity.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": volumes,
                    # The engine needs no API access, nor env vars naming every Service.
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                },
            },
        },
    }
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": launch.port, "protocol": "TCP"}
            ],
        },
    }
    return deployment, service


def _not_running(state: Any) -> tuple[bool, str, str] | None:
    """(terminated?, reason, "reason: message") of a container state other than running."""
    if state is None:
        return None
    if state.waiting is not None:
        reason = str(state.waiting.reason or "")
        return False, reason, ": ".join(p for p in (reason, state.waiting.message) if p)
    if state.terminated is not None:
        terminated = state.terminated
        reason = str(terminated.reason or "")
        text = ": ".join(p for p in (reason, terminated.message) if p)
        code = f"exit code {terminated.exit_code}"
        return True, reason, f"{text} ({code})" if text else code
    return None


def _base_url(pod_ip: str, port: int) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}"


def _pod_replica(pod: Any, spec: ReplicaSetSpec, now: datetime) -> ReplicaInfo:
    """One pod as a replica: its state, address and why it is not ready."""
    status = pod.status
    phase = status.phase if status is not None else None
    conditions = (status.conditions if status is not None else None) or []
    containers = (status.container_statuses if status is not None else None) or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    started_at: datetime | None = status.start_time if status is not None else None
    exited = phase in ("Failed", "Succeeded")
    reasons: list[str] = []
    if status is not None and (status.reason or status.message):
        # Pod-level: "Evicted: The node was low on resource: memory."
        reasons.append(": ".join(p for p in (status.reason, status.message) if p))
    for condition in conditions:
        if condition.type == "PodScheduled" and condition.status == "False":
            # "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
            reasons.append(": ".join(p for p in (condition.reason, condition.message) if p))
    for container in containers:
        current = _not_running(container.state)
        if current is not None:
            terminated, reason, text = current
            if terminated or reason in _FAILED_WAITING:
                exited = True
            reasons.append(text)
        last = _not_running(container.last_state)
        if last is not None and last[0] and not ready:
            reasons.append(f"last exit: {last[2]}")
    if exited:
        state = ReplicaState.EXITED
    elif ready:
        state = ReplicaState.READY
    elif (
        started_at is not None
        and (now - started_at).total_seconds() > spec.launch.startup_timeout_s
    ):
        state = ReplicaState.UNHEALTHY
    else:
        state = ReplicaState.STARTING
    pod_ip = status.pod_ip if status is not None else None
    return ReplicaInfo(
        name=str(pod.metadata.name),
        state=state,
        url=_base_url(str(pod_ip), spec.launch.port) if pod_ip else None,
        port=spec.launch.port,
        node=(pod.spec.node_name if pod.spec is not None else None) or None,
        started_at=started_at,
        restarts=sum(int(c.restart_count or 0) for c in containers),
        reason="; ".join(r for r in reasons if r),
    )


class KubernetesProvider:
    """A `ClusterProvider` for one Kubernetes or OpenShift cluster.

    Build it with `from_kubeconfig` or `in_cluster`, and call `close()` (synchronous: it
    only releases the client's connection pool and threads) when done with it.
    """

    kind = ClusterKind.KUBERNETES

    def __init__(
        self,
        configuration: object,
        *,
        cluster_id: uuid.UUID,
        namespace: str,
        request_timeout: float = 10.0,
    ) -> None:
        """`configuration` is a `kubernetes.client.Configuration` this provider then owns;
        prefer the `from_kubeconfig` and `in_cluster` constructors."""
        if not _NAMESPACE_NAME.match(namespace):
            raise InvalidClusterConfig(f"{namespace!r} is not a valid namespace name")
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        config: Any = configuration
        # The activity's retry policy owns retrying; urllib3 retrying underneath it would
        # multiply attempts against a struggling server and delay the failure report.
        # (Zero rather than False: with False, urllib3 raises its bare SSLError, which
        # kubernetes 36's client mangles into an AttributeError.)
        config.retries = 0
        _send_bearer_token(config)
        self.cluster_id = cluster_id
        self.namespace = namespace
        self.request_timeout = request_timeout
        self.server_url = str(config.host)
        self._api: Any = k8s.ApiClient(config)

    @classmethod
    def from_kubeconfig(
        cls,
        kubeconfig: str,
        *,
        cluster_id: uuid.UUID,
        namespace: str,
        request_timeout: float = 10.0,
    ) -> KubernetesProvider:
        document = _load_document(kubeconfig)
        context_name, _, _ = _active_cluster(document)
        _refuse_host_references(document)
        configuration = k8s.Configuration()
        try:
            k8s_config.load_kube_config_from_dict(
                document,
                context=context_name,
                client_configuration=configuration,
                persist_config=False,
            )
        except ConfigException as exc:
            # The loader's messages name keys and entries, never their values.
            raise InvalidClusterConfig(f"unusable kubeconfig: {exc}") from None
        except (binascii.Error, UnicodeError):
            raise InvalidClusterConfig(
                "the kubeconfig's certificate or key data is not valid base64"
            ) from None
        except (KeyError, TypeError, AttributeError, ValueError):
            raise InvalidClusterConfig(
                "the kubeconfig's context, cluster or user section is malformed"
            ) from None
        _check_tls_material(configuration)
        return cls(
            configuration,
            cluster_id=cluster_id,
            namespace=namespace,
            request_timeout=request_timeout,
        )

    @classmethod
    def in_cluster(
        cls,
        *,
        cluster_id: uuid.UUID,
        namespace: str,
        request_timeout: float = 10.0,
    ) -> KubernetesProvider:
        """The cluster this process runs in, with its pod's service account."""
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise InvalidClusterConfig(f"not running in a Kubernetes pod: {exc}") from None
        return cls(
            configuration,
            cluster_id=cluster_id,
            namespace=namespace,
            request_timeout=request_timeout,
        )

    def close(self) -> None:
        self._api.close()
        self._api.rest_client.pool_manager.clear()

    # -- plumbing ------------------------------------------------------------------------

    async def _call(
        self,
        what: str,
        operation: Callable[..., Any],
        *args: Any,
        tolerate: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> Any:
        """Run one client operation in a thread, mapping failures onto provider errors.

        Returns None when the server answers with a status listed in `tolerate`.
        """
        try:
            return await asyncio.to_thread(
                operation, *args, _request_timeout=self.request_timeout, **kwargs
            )
        except ApiException as exc:
            if exc.status in tolerate:
                return None
            raise self._refusal(what, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = _transport_reason(exc, self.request_timeout)
            raise ClusterUnreachable(f"cannot reach {self.server_url}: {reason}") from None
        except (ValueError, TypeError):
            # The client validates what it deserializes: an answer without the fields of a
            # Kubernetes object (a web page behind the URL, say) fails here.
            raise ProviderError(
                f"{what} on {self.server_url} gave an answer that is not a Kubernetes API response"
            ) from None

    def _refusal(self, what: str, exc: Any) -> ProviderError:
        status = int(exc.status or 0)
        message = _status_message(exc)
        answered = f"{what} on {self.server_url} answered {status} {exc.reason or ''}".rstrip()
        if message and message != exc.reason:
            answered = f"{answered}: {message}"
        if status in (401, 403):
            return ClusterAuthError(answered)
        if status == 429 or status >= 500:
            return ClusterUnreachable(answered)
        return ProviderError(answered)

    def _labels(self) -> dict[str, str]:
        return {MANAGED_BY_LABEL: MANAGED_BY, CLUSTER_LABEL: str(self.cluster_id)}

    # -- the protocol --------------------------------------------------------------------

    async def connect(self) -> ConnectionInfo:
        version = await self._call("GET /version", k8s.VersionApi(self._api).get_code)
        groups = await self._call("GET /apis", k8s.ApisApi(self._api).get_api_versions)
        names = [str(group.name) for group in (groups.groups or [])]
        openshift = any(name.endswith(".openshift.io") for name in names)
        return ConnectionInfo(
            server_url=self.server_url,
            platform=Platform.OPENSHIFT if openshift else Platform.KUBERNETES,
            version=str(version.git_version),
        )

    async def discover(self) -> Inventory:
        connection = await self.connect()
        nodes = await self._call("GET /api/v1/nodes", k8s.CoreV1Api(self._api).list_node)
        return Inventory(
            connection=connection,
            nodes=[_node_info(node) for node in (nodes.items or [])],
        )

    async def prepare(self) -> PrepareResult:
        core = k8s.CoreV1Api(self._api)
        ns = self.namespace
        created: list[str] = []
        namespace = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": self._labels()},
        }
        answer = await self._call(
            "POST /api/v1/namespaces", core.create_namespace, namespace, tolerate=_EXISTS
        )
        if answer is not None:
            created.append(f"namespace/{ns}")
        else:
            existing = await self._call(
                f"GET /api/v1/namespaces/{ns}", core.read_namespace, ns, tolerate=_MISSING
            )
            phase = existing.status.phase if existing is not None and existing.status else None
            if existing is None or phase == "Terminating":
                # A teardown is still finishing: nothing can be created in it until it is
                # gone, and then a retried prepare creates it afresh.
                raise ClusterUnreachable(f"namespace {ns} is being deleted; retry once it is gone")
        account = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": ns, "labels": self._labels()},
        }
        answer = await self._call(
            f"POST /api/v1/namespaces/{ns}/serviceaccounts",
            core.create_namespaced_service_account,
            ns,
            account,
            tolerate=_EXISTS,
        )
        if answer is not None:
            created.append(f"serviceaccount/{ns}/{SERVICE_ACCOUNT}")
        state = f"created {', '.join(created)}" if created else "everything already existed"
        return PrepareResult(
            created=created,
            detail=f"namespace {ns} with service account {SERVICE_ACCOUNT}: {state}",
        )

    async def smoke_check(self) -> str:
        """Reads back what `prepare` made and lists pods in the namespace.

        Something missing raises `ClusterUnreachable`, not a permanent error: a retried
        onboarding (which runs `prepare` again) repairs it, whereas a permanent error would
        strand a cluster whose namespace was deleted by hand.
        """
        core = k8s.CoreV1Api(self._api)
        ns = self.namespace
        namespace = await self._call(
            f"GET /api/v1/namespaces/{ns}", core.read_namespace, ns, tolerate=_MISSING
        )
        if namespace is None:
            raise ClusterUnreachable(f"namespace {ns} not found on {self.server_url}")
        account = await self._call(
            f"GET /api/v1/namespaces/{ns}/serviceaccounts/{SERVICE_ACCOUNT}",
            core.read_namespaced_service_account,
            SERVICE_ACCOUNT,
            ns,
            tolerate=_MISSING,
        )
        if account is None:
            raise ClusterUnreachable(
                f"service account {SERVICE_ACCOUNT} not found in namespace {ns} "
                f"on {self.server_url}"
            )
        # One item is enough to prove read permission; a busy namespace need not be listed.
        await self._call(f"GET /api/v1/namespaces/{ns}/pods", core.list_namespaced_pod, ns, limit=1)
        phase = namespace.status.phase if namespace.status is not None else None
        return (
            f"namespace {ns} ({phase or 'unknown phase'}), service account "
            f"{SERVICE_ACCOUNT} present, pods listable"
        )

    async def teardown(self) -> list[str]:
        core = k8s.CoreV1Api(self._api)
        ns = self.namespace
        namespace = await self._call(
            f"GET /api/v1/namespaces/{ns}", core.read_namespace, ns, tolerate=_MISSING
        )
        if namespace is None:
            return []
        labels = namespace.metadata.labels or {}
        if labels.get(CLUSTER_LABEL) != str(self.cluster_id):
            # Not ours (pre-existing, or another cluster record's): never delete it.
            return []
        deleted = await self._call(
            f"DELETE /api/v1/namespaces/{ns}", core.delete_namespace, ns, tolerate=_MISSING
        )
        return [f"namespace/{ns}"] if deleted is not None else []

    # -- replica sets ----------------------------------------------------------------------

    async def ensure_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        """Create the set's Deployment and Service, or patch them to the spec.

        The Deployment controller keeps the count: it replaces failed pods and removes
        extras itself, so this only states the desired replicas and pod template.
        """
        deployment, service = replica_set_manifests(spec, self.namespace)
        apps = k8s.AppsV1Api(self._api)
        core = k8s.CoreV1Api(self._api)
        ns = self.namespace
        await self._create_or_patch(
            f"apis/apps/v1/namespaces/{ns}/deployments",
            apps.create_namespaced_deployment,
            apps.patch_namespaced_deployment,
            deployment,
            {
                "metadata": {"labels": deployment["metadata"]["labels"]},
                "spec": {
                    key: deployment["spec"][key]
                    for key in ("replicas", "strategy", "revisionHistoryLimit", "template")
                },
            },
        )
        await self._create_or_patch(
            f"api/v1/namespaces/{ns}/services",
            core.create_namespaced_service,
            core.patch_namespaced_service,
            service,
            # Not the whole spec: the cluster IP the server assigned must stay.
            {
                "metadata": {"labels": service["metadata"]["labels"]},
                "spec": {key: service["spec"][key] for key in ("selector", "ports")},
            },
        )
        return await self.list_replicas(spec)

    async def _create_or_patch(
        self,
        collection: str,
        create: Callable[..., Any],
        patch: Callable[..., Any],
        manifest: dict[str, Any],
        changes: dict[str, Any],
    ) -> None:
        name = manifest["metadata"]["name"]
        created = await self._call(
            f"POST /{collection}", create, self.namespace, manifest, tolerate=_EXISTS
        )
        if created is not None:
            return
        patched = await self._call(
            f"PATCH /{collection}/{name}",
            patch,
            name,
            self.namespace,
            changes,
            _content_type=_MERGE_PATCH,
            tolerate=_MISSING,
        )
        if patched is None:
            # Deleted between our create and patch: the retried call creates it.
            raise ClusterUnreachable(f"{collection}/{name} vanished while being updated; retry")

    async def list_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        pods = await self._pods(f"{LABEL_ENDPOINT}={spec.endpoint_id}")
        now = datetime.now(UTC)
        return [_pod_replica(pod, spec, now) for pod in pods]

    async def _pods(self, selector: str) -> list[Any]:
        """The pods matching `selector`, by name, without those being deleted (the
        Deployment has already replaced them)."""
        core = k8s.CoreV1Api(self._api)
        answer = await self._call(
            f"GET /api/v1/namespaces/{self.namespace}/pods",
            core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
        )
        pods = [pod for pod in (answer.items or []) if pod.metadata.deletion_timestamp is None]
        return sorted(pods, key=lambda pod: str(pod.metadata.name))

    async def delete_replicas(self, name: str) -> list[str]:
        apps = k8s.AppsV1Api(self._api)
        core = k8s.CoreV1Api(self._api)
        ns = self.namespace
        removed: list[str] = []
        # Background: the garbage collector removes the ReplicaSets and pods after.
        deleted = await self._call(
            f"DELETE /apis/apps/v1/namespaces/{ns}/deployments/{name}",
            apps.delete_namespaced_deployment,
            name,
            ns,
            propagation_policy="Background",
            tolerate=_MISSING,
        )
        if deleted is not None:
            removed.append(f"deployment/{ns}/{name}")
        deleted = await self._call(
            f"DELETE /api/v1/namespaces/{ns}/services/{name}",
            core.delete_namespaced_service,
            name,
            ns,
            tolerate=_MISSING,
        )
        if deleted is not None:
            removed.append(f"service/{ns}/{name}")
        return removed

    async def replica_logs(self, name: str, replica: str | None, tail: int) -> dict[str, str]:
        pods = await self._pods(f"{APP_NAME_LABEL}={name}")
        names = [str(pod.metadata.name) for pod in pods]
        if replica is not None:
            if replica not in names:
                raise ReplicaNotFound(f"replica set {name} has no replica {replica}")
            names = [replica]
        return {pod: await self._pod_log(pod, tail) for pod in names}

    async def _pod_log(self, pod: str, tail: int) -> str:
        core = k8s.CoreV1Api(self._api)
        what = f"GET /api/v1/namespaces/{self.namespace}/pods/{pod}/log"
        for previous in (False, True):
            # 400: the container is waiting (starting, or crash-looping: then the previous
            # container's log tells why it exited). 404: the pod went away meanwhile.
            text = await self._call(
                what,
                _read_log,
                core,
                pod,
                self.namespace,
                container=ENGINE_CONTAINER,
                tail_lines=max(tail, 0),
                limit_bytes=_MAX_LOG_BYTES,
                previous=previous,
                tolerate=frozenset({400, 404}),
            )
            if text is not None:
                return str(text)
        return ""


def _read_log(core: Any, pod: str, namespace: str, **kwargs: Any) -> str:
    """The log as text. The client's own decoding turns a plain-text body into the repr of
    its bytes ("b'...'"), so the body is read raw and decoded here."""
    response = core.read_namespaced_pod_log(pod, namespace, _preload_content=False, **kwargs)
    try:
        data: bytes = response.data
    finally:
        response.release_conn()
    return data.decode("utf-8", errors="replace")
