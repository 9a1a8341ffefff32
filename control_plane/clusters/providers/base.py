"""The `ClusterProvider` protocol and the errors every provider raises.

A provider is built for one cluster from its kind and its revealed credential. Its
methods are blocking-free coroutines; providers wrapping synchronous clients run them in
a thread. Errors say whether retrying can help: `ClusterUnreachable` is transient (the
caller retries or counts failed checks), `ClusterAuthError` and `InvalidClusterConfig`
are permanent (retrying would only storm the API server).

`ReplicaProvider` adds what endpoints need: keep a replica set of a launch spec running
with an exact count, list it with each replica's health, read logs, delete it.
"""

from __future__ import annotations

from typing import Protocol

from workflows.contracts.clusters import ClusterKind, ConnectionInfo, Inventory, PrepareResult
from workflows.contracts.endpoints import ReplicaInfo, ReplicaSetSpec


class ProviderError(Exception):
    """Base of provider errors; the message is safe to show (no secrets)."""


class ClusterUnreachable(ProviderError):
    """Network failure, timeout or a 5xx from the cluster: worth retrying."""


class ClusterAuthError(ProviderError):
    """The cluster refused our credentials (401/403): retrying will not help."""


class InvalidClusterConfig(ProviderError):
    """The credential cannot describe a cluster (bad kubeconfig, missing context...)."""


class ReplicaNotFound(ProviderError):
    """Logs (or anything else) were asked of a replica the provider does not have."""


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


class ReplicaProvider(Protocol):
    """Replica sets on a cluster. Every method is idempotent; names are deterministic
    (`ReplicaSetSpec.name`), so a retried or repeated call finds what an earlier one made.
    """

    async def ensure_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        """Make exactly `spec.replicas` replicas of `spec.launch` exist: keep healthy and
        starting ones (never restart them needlessly), replace exited ones, start missing
        ones, remove extras (highest index first). Returns the replicas afterwards."""
        ...

    async def list_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        """The replicas that exist, each with its current state (health checked)."""
        ...

    async def delete_replicas(self, name: str) -> list[str]:
        """Stop and remove every replica of the set `name`; missing is success. Returns
        what was removed."""
        ...

    async def replica_logs(self, name: str, replica: str | None, tail: int) -> dict[str, str]:
        """The last `tail` lines of each replica's log (one replica when named), by
        replica name. `ReplicaNotFound` for a named replica that does not exist."""
        ...
