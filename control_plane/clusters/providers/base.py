"""The `ClusterProvider` protocol and the errors every provider raises.

A provider is built for one cluster from its kind and its revealed credential. Its
methods are blocking-free coroutines; providers wrapping synchronous clients run them in
a thread. Errors say whether retrying can help: `ClusterUnreachable` is transient (the
caller retries or counts failed checks), `ClusterAuthError` and `InvalidClusterConfig`
are permanent (retrying would only storm the API server).

Replica operations (`ensure_replica`, `delete_replica`, `list_replicas`,
`replica_health`) join the protocol with the endpoints that use them.
"""

from __future__ import annotations

from typing import Protocol

from workflows.contracts.clusters import ClusterKind, ConnectionInfo, Inventory, PrepareResult


class ProviderError(Exception):
    """Base of provider errors; the message is safe to show (no secrets)."""


class ClusterUnreachable(ProviderError):
    """Network failure, timeout or a 5xx from the cluster: worth retrying."""


class ClusterAuthError(ProviderError):
    """The cluster refused our credentials (401/403): retrying will not help."""


class InvalidClusterConfig(ProviderError):
    """The credential cannot describe a cluster (bad kubeconfig, missing context...)."""


class ClusterProvider(Protocol):
    kind: ClusterKind

    async def connect(self) -> ConnectionInfo:
        """Reach the cluster and identify it (server URL, platform, version)."""
        ...

    async def discover(self) -> Inventory:
        """Nodes with CPU, memory and accelerators, and whether each is ready."""
        ...

    async def prepare(self) -> PrepareResult:
        """Create what the control plane needs on the cluster; existing is success."""
        ...

    async def smoke_check(self) -> str:
        """Prove the prepared cluster is usable; returns what was checked."""
        ...

    async def teardown(self) -> list[str]:
        """Remove what `prepare` created; missing is success. Returns what was removed."""
        ...
