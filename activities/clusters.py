"""Cluster activities: provider calls (the `cp-cluster` pool) and the bookkeeping that
writes their results into PostgreSQL (the orchestration pool).

Provider activities reveal the cluster's credential just before they need it and keep
it out of everything they return, log or raise. Permanent problems become
non-retryable `ApplicationError`s with a type from the contracts; transient ones are
retryable, so the workflow's retry policy decides how long to keep trying.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from control_plane.clusters.providers.base import (
    ClusterAuthError,
    ClusterProvider,
    ClusterUnreachable,
    InvalidClusterConfig,
    ProviderError,
)
from control_plane.clusters.providers.kubernetes import InvalidReplicaSpec, KubernetesProvider
from control_plane.clusters.providers.local import LocalProvider
from control_plane.clusters.repository import ClusterRepository
from control_plane.core.db import session_scope
from control_plane.core.errors import NotFound
from control_plane.core.logging import get_logger
from control_plane.credentials.crypto import Vault, VaultError
from control_plane.credentials.providers import Provider
from control_plane.credentials.service import reveal
from workflows.contracts.clusters import (
    AUTH_FAILED,
    CLUSTER_GONE,
    INVALID_CREDENTIAL,
    ClusterKind,
    ClusterStatus,
    ClusterTarget,
    ConnectionInfo,
    HealthReport,
    Inventory,
    PrepareResult,
    SaveInventory,
    StatusChange,
)
from workflows.contracts.endpoints import INVALID_ENDPOINT

log = get_logger(__name__)

UNREACHABLE = "ClusterUnreachable"
HEARTBEAT_EVERY_SECONDS = 2.0


def _permanent(message: str, kind: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def _as_activity_error(err: ProviderError) -> ApplicationError:
    if isinstance(err, InvalidReplicaSpec):
        return _permanent(str(err), INVALID_ENDPOINT)
    if isinstance(err, InvalidClusterConfig):
        return _permanent(str(err), INVALID_CREDENTIAL)
    if isinstance(err, ClusterAuthError):
        return _permanent(str(err), AUTH_FAILED)
    return ApplicationError(str(err), type=UNREACHABLE)


async def _heartbeat() -> None:
    """Heartbeat while a provider call runs, so a worker that dies mid-call is noticed
    within the heartbeat timeout (not the whole call timeout) and cancellation arrives."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(HEARTBEAT_EVERY_SECONDS)


class ClusterActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        vault: Vault,
        *,
        work_dir: Path | None = None,
        nvidia_smi: str = "nvidia-smi",
        replicas_dir: Path | None = None,
    ) -> None:
        self.sessions = sessions
        self.vault = vault
        self.work_dir = work_dir
        self.nvidia_smi = nvidia_smi
        self.replicas_dir = replicas_dir

    async def _kubeconfig(self, target: ClusterTarget) -> str | None:
        if target.credential_id is None:
            return None
        try:
            async with session_scope(self.sessions) as session:
                fields = await reveal(
                    session, self.vault, target.credential_id, tenant_id=target.tenant_id
                )
        except NotFound:
            raise _permanent(
                f"credential {target.credential_id} no longer exists", INVALID_CREDENTIAL
            ) from None
        except VaultError as err:
            raise _permanent(
                f"credential {target.credential_id} cannot be opened: {err}", INVALID_CREDENTIAL
            ) from None
        if fields.get("provider") != Provider.KUBECONFIG.value:
            raise _permanent(
                f"credential {target.credential_id} is not a kubeconfig", INVALID_CREDENTIAL
            )
        return str(fields["kubeconfig"])

    @asynccontextmanager
    async def _provider(self, target: ClusterTarget) -> AsyncIterator[ClusterProvider]:
        async with self.replica_provider(target) as provider:
            yield provider

    @asynccontextmanager
    async def replica_provider(
        self, target: ClusterTarget
    ) -> AsyncIterator[LocalProvider | KubernetesProvider]:
        """The cluster's provider (with replica operations), heartbeating while in use;
        provider errors leave as activity errors that say whether to retry."""
        provider: LocalProvider | KubernetesProvider
        kubernetes: KubernetesProvider | None = None
        beating = asyncio.create_task(_heartbeat())
        try:
            if target.kind is ClusterKind.LOCAL:
                work_dir = self.work_dir / str(target.cluster_id) if self.work_dir else None
                provider = LocalProvider(
                    nvidia_smi=self.nvidia_smi, work_dir=work_dir, replicas_dir=self.replicas_dir
                )
            else:
                kubeconfig = await self._kubeconfig(target)
                if kubeconfig is None:
                    kubernetes = KubernetesProvider.in_cluster(
                        cluster_id=target.cluster_id, namespace=target.namespace
                    )
                else:
                    kubernetes = KubernetesProvider.from_kubeconfig(
                        kubeconfig, cluster_id=target.cluster_id, namespace=target.namespace
                    )
                provider = kubernetes
            yield provider
        except ProviderError as err:
            raise _as_activity_error(err) from None
        finally:
            beating.cancel()
            if kubernetes is not None:
                kubernetes.close()

    @activity.defn(name="validate_cluster_credential")
    async def validate_cluster_credential(self, target: ClusterTarget) -> str:
        async with self._provider(target) as provider:
            if target.kind is ClusterKind.LOCAL:
                return "local cluster: no credential needed"
            if target.credential_id is None:
                return f"in-cluster service account ({type(provider).__name__})"
            return f"kubeconfig credential {target.credential_id} is usable"

    @activity.defn(name="connect_cluster")
    async def connect_cluster(self, target: ClusterTarget) -> ConnectionInfo:
        async with self._provider(target) as provider:
            return await provider.connect()

    @activity.defn(name="discover_cluster")
    async def discover_cluster(self, target: ClusterTarget) -> Inventory:
        async with self._provider(target) as provider:
            return await provider.discover()

    @activity.defn(name="prepare_cluster")
    async def prepare_cluster(self, target: ClusterTarget) -> PrepareResult:
        async with self._provider(target) as provider:
            return await provider.prepare()

    @activity.defn(name="smoke_check_cluster")
    async def smoke_check_cluster(self, target: ClusterTarget) -> str:
        async with self._provider(target) as provider:
            return await provider.smoke_check()

    @activity.defn(name="teardown_cluster")
    async def teardown_cluster(self, target: ClusterTarget) -> list[str]:
        async with self._provider(target) as provider:
            return await provider.teardown()

    @activity.defn(name="check_cluster_health")
    async def check_cluster_health(self, target: ClusterTarget) -> HealthReport:
        """A failed check is a result, not an error: the monitor counts failures."""
        now = datetime.now(UTC)
        try:
            async with self._provider(target) as provider:
                inventory = await provider.discover()
        except ApplicationError as err:
            return HealthReport(reachable=False, reason=err.message, checked_at=now)
        except (ClusterUnreachable, OSError) as err:
            return HealthReport(reachable=False, reason=str(err), checked_at=now)
        return HealthReport(reachable=True, inventory=inventory, checked_at=now)

    @activity.defn(name="set_cluster_status")
    async def set_cluster_status(self, change: StatusChange) -> ClusterStatus:
        """Returns the status stored after the call (unchanged when guarded)."""
        async with session_scope(self.sessions) as session:
            repo = ClusterRepository(session)
            row = await repo.get(change.cluster_id, for_update=True)
            if row is None:
                raise _permanent(f"cluster {change.cluster_id} does not exist", CLUSTER_GONE)
            current = ClusterStatus(row.status)
            if current in change.unless_in:
                return current
            if repo.set_status(row, change.status, change.reason):
                log.info(
                    "clusters.status.changed",
                    cluster_id=str(row.id),
                    status=change.status.value,
                    previous=current.value,
                    reason=change.reason,
                )
            return change.status

    @activity.defn(name="save_cluster_inventory")
    async def save_cluster_inventory(self, save: SaveInventory) -> ClusterStatus:
        async with session_scope(self.sessions) as session:
            repo = ClusterRepository(session)
            row = await repo.get(save.cluster_id, for_update=True)
            if row is None:
                raise _permanent(f"cluster {save.cluster_id} does not exist", CLUSTER_GONE)
            current = ClusterStatus(row.status)
            if current in save.unless_in:
                return current
            await repo.save_inventory(row, save.inventory, datetime.now(UTC))
            if repo.set_status(row, save.status, save.reason):
                log.info(
                    "clusters.status.changed",
                    cluster_id=str(row.id),
                    status=save.status.value,
                    previous=current.value,
                    reason=save.reason,
                )
            return save.status
