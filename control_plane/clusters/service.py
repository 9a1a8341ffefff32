"""Clusters: onboarding, reads, refresh, deletion and placement, with permission checks.

Clusters belong to the tenant: every user of the tenant may read them, tenant admins
write them. Workflows are started after the request's transaction commits (their
activities must see the new rows); if Temporal refuses, the cluster is marked `failed`
with the reason and the caller gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from control_plane.audit import service as audit
from control_plane.clusters.errors import UnusableCredential
from control_plane.clusters.placement import Candidate, Demand, rank
from control_plane.clusters.providers.base import InvalidClusterConfig
from control_plane.clusters.providers.kubernetes import server_url_of
from control_plane.clusters.repository import SORTABLE, ClusterRepository
from control_plane.clusters.schemas import (
    AcceleratorRead,
    ClusterDetail,
    ClusterList,
    ClusterRead,
    KubernetesClusterCreate,
    LocalClusterCreate,
    NodeRead,
    RecommendationList,
    StatusEvent,
)
from control_plane.clusters.tables import Accelerator, Cluster, ClusterEvent, ClusterNode
from control_plane.core import temporal
from control_plane.core.config import Settings
from control_plane.core.db import after_commit, session_scope
from control_plane.core.errors import Conflict, ControlPlaneError, NotFound
from control_plane.core.logging import get_logger
from control_plane.core.pagination import paginate
from control_plane.credentials.crypto import Vault
from control_plane.credentials.providers import Provider
from control_plane.credentials.repository import CredentialRepository
from control_plane.credentials.service import reveal
from control_plane.endpoints.repository import EndpointRepository
from control_plane.identity.permissions import Principal, authorize
from control_plane.identity.repository import IdentityRepository
from control_plane.workflow_runs.service import WorkflowRunService
from workflows.contracts.clusters import (
    REFRESH_SIGNAL,
    AcceleratorInfo,
    ClusterKind,
    ClusterStatus,
    ClusterTarget,
    DeleteClusterRequest,
    NodeInfo,
    OnboardClusterRequest,
    delete_workflow_id,
    monitor_workflow_id,
    namespace_for,
    onboard_workflow_id,
)
from workflows.contracts.common import ResourceRef

log = get_logger(__name__)

RESOURCE_KIND = "cluster"
ONBOARD_WORKFLOW = "OnboardCluster"
DELETE_WORKFLOW = "DeleteCluster"
IN_CLUSTER_SERVER = "https://kubernetes.default.svc"
# How long a new delete waits for the previous run of the same id to close.
PREVIOUS_RUN_GRACE_SECONDS = 30
MONITORED = (ClusterStatus.AVAILABLE, ClusterStatus.DEGRADED, ClusterStatus.UNREACHABLE)


def local_server_url() -> str:
    """A `local` cluster is the machine the control plane's workers run on."""
    return f"local://{socket.gethostname()}"


def target_of(row: Cluster) -> ClusterTarget:
    return ClusterTarget(
        cluster_id=row.id,
        tenant_id=row.tenant_id,
        kind=ClusterKind(row.kind),
        credential_id=row.credential_id,
        namespace=row.namespace,
    )


def resource_of(row: Cluster) -> ResourceRef:
    return ResourceRef(kind=RESOURCE_KIND, id=str(row.id), tenant_id=row.tenant_id)


def current_workflow_id(row: Cluster) -> str | None:
    status = ClusterStatus(row.status)
    if status is ClusterStatus.ONBOARDING:
        return onboard_workflow_id(row.id)
    if status is ClusterStatus.DELETING:
        return delete_workflow_id(row.id)
    if status in MONITORED:
        return monitor_workflow_id(row.id)
    return None


def node_info(node: ClusterNode, accelerators: list[Accelerator]) -> NodeInfo:
    return NodeInfo(
        name=node.name,
        ready=node.status == "ready",
        reason=node.reason,
        cpu_cores=node.cpu_cores,
        memory_mb=node.memory_mb,
        allocatable_cpu=node.allocatable_cpu,
        allocatable_memory_mb=node.allocatable_memory_mb,
        labels=node.labels,
        accelerators=[
            AcceleratorInfo(
                vendor=a.vendor,
                model=a.model,
                memory_mb=a.memory_mb,
                count=a.count,
                allocatable=a.allocatable,
                driver_version=a.driver_version,
                cuda_version=a.cuda_version,
            )
            for a in accelerators
        ],
    )


@dataclass(frozen=True)
class ListFilters:
    status: ClusterStatus | None = None
    kind: ClusterKind | None = None
    include_deleted: bool = False


class ClusterService:
    def __init__(
        self, session: AsyncSession, vault: Vault, client: Client, *, queue_prefix: str = ""
    ) -> None:
        self.session = session
        self.repo = ClusterRepository(session)
        self.vault = vault
        self.client = client
        self.queue_prefix = queue_prefix

    async def _require(
        self, principal: Principal, cluster_id: uuid.UUID, scope: str, *, for_update: bool = False
    ) -> Cluster:
        row = await self.repo.get(cluster_id, for_update=for_update)
        if row is None or row.status == ClusterStatus.DELETED.value:
            raise NotFound("cluster not found")
        authorize(principal, scope, tenant_id=row.tenant_id, what="cluster")
        return row

    async def _audit(
        self,
        principal: Principal,
        action: str,
        row: Cluster,
        details: dict[str, Any] | None = None,
    ) -> None:
        await audit.record(
            self.session,
            actor=principal,
            action=action,
            resource_kind=RESOURCE_KIND,
            resource_id=row.id,
            tenant_id=row.tenant_id,
            details=details,
        )

    async def _server_url(
        self, principal: Principal, body: LocalClusterCreate | KubernetesClusterCreate
    ) -> str:
        if isinstance(body, LocalClusterCreate):
            return local_server_url()
        if body.credential_id is None:
            return IN_CLUSTER_SERVER
        credential = await CredentialRepository(self.session).live(
            principal.tenant_id, None, body.credential_id
        )
        if credential is None:
            raise NotFound(
                f"credential {body.credential_id} not found among the tenant-wide credentials"
            )
        if credential.provider != Provider.KUBECONFIG.value:
            raise UnusableCredential(
                f"credential {credential.name!r} is a {credential.provider} credential; "
                "a kubernetes cluster needs a kubeconfig",
                field="credential_id",
            )
        fields = await reveal(
            self.session, self.vault, credential.id, tenant_id=principal.tenant_id
        )
        try:
            return server_url_of(str(fields["kubeconfig"]))
        except InvalidClusterConfig as err:
            raise UnusableCredential(
                f"the kubeconfig of credential {credential.name!r} cannot be used: {err}",
                field="credential_id",
            ) from None

    async def create(
        self, principal: Principal, body: LocalClusterCreate | KubernetesClusterCreate
    ) -> ClusterRead:
        authorize(principal, "clusters:write", tenant_id=principal.tenant_id, what="cluster")
        if await self.repo.name_taken(principal.tenant_id, body.name):
            raise Conflict(f"a cluster named {body.name!r} already exists", name=body.name)
        server_url = await self._server_url(principal, body)
        holder = await self.repo.holding_server(principal.tenant_id, server_url)
        if holder is not None:
            raise Conflict(
                f"{server_url} is already onboarded as cluster {holder.name!r}",
                cluster_id=str(holder.id),
            )
        cluster_id = uuid.uuid4()
        credential_id, namespace = (
            (body.credential_id, body.namespace)
            if isinstance(body, KubernetesClusterCreate)
            else (None, None)
        )
        row = Cluster(
            id=cluster_id,
            tenant_id=principal.tenant_id,
            name=body.name,
            kind=body.kind.value,
            credential_id=credential_id,
            server_url=server_url,
            namespace=namespace or namespace_for(cluster_id),
            status=ClusterStatus.ONBOARDING.value,
            settings=body.settings.model_dump(mode="json"),
            created_by=principal.user_id,
        )
        self.repo.add(row)
        self.session.add(
            ClusterEvent(cluster_id=row.id, status=row.status, reason="onboarding started")
        )
        await self.repo.flush()
        await self._audit(
            principal,
            "cluster.create",
            row,
            {"name": row.name, "kind": row.kind, "server_url": server_url},
        )
        request = OnboardClusterRequest(cluster=target_of(row), monitor=body.settings)
        after_commit(
            self.session,
            lambda session: self._start(
                session, row.id, ONBOARD_WORKFLOW, onboard_workflow_id(row.id), request
            ),
        )
        return ClusterRead.of(row, workflow_id=onboard_workflow_id(row.id))

    async def _start(
        self,
        session: AsyncSession,
        cluster_id: uuid.UUID,
        workflow: str,
        workflow_id: str,
        payload: Any,
    ) -> None:
        repo = ClusterRepository(session)
        row = await repo.get(cluster_id)
        assert row is not None
        try:
            handle = await self._start_after_previous(workflow, payload, workflow_id, row)
            await WorkflowRunService(session, self.client).record_started(
                handle, workflow, resource_of(row)
            )
        except (ControlPlaneError, RPCError) as err:
            message = err.message
            log.warning("clusters.workflow.start_failed", workflow_id=workflow_id, error=message)
            repo.set_status(row, ClusterStatus.FAILED, f"could not start {workflow}: {message}")
            raise

    async def _start_after_previous(
        self, workflow: str, payload: Any, workflow_id: str, row: Cluster
    ) -> WorkflowHandle[Any, Any]:
        """Start the workflow; a run with this id that is still open has already written
        its outcome (the row left the state it works in), so let it close first rather
        than attach to it."""
        start = functools.partial(
            temporal.start_workflow,
            self.client,
            workflow,
            payload,
            workflow_id=workflow_id,
            resource=resource_of(row),
            queue_prefix=self.queue_prefix,
        )
        try:
            return await start()
        except Conflict:
            previous = self.client.get_workflow_handle(workflow_id)
            try:
                with contextlib.suppress(WorkflowFailureError):
                    await asyncio.wait_for(previous.result(), PREVIOUS_RUN_GRACE_SECONDS)
            except TimeoutError:
                raise Conflict(
                    f"{workflow_id} is still running; try again once it has finished",
                    workflow_id=workflow_id,
                ) from None
            return await start()

    async def list(
        self,
        principal: Principal,
        filters: ListFilters,
        *,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> ClusterList:
        authorize(principal, "clusters:read", tenant_id=principal.tenant_id, what="cluster")
        assert sort in SORTABLE
        query = self.repo.listing(
            principal.tenant_id,
            status=filters.status,
            kind=filters.kind.value if filters.kind else None,
            include_deleted=filters.include_deleted,
        )
        return await paginate(
            self.session,
            query,
            Cluster,
            ClusterRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
            convert=lambda row: ClusterRead.of(row, workflow_id=current_workflow_id(row)),
        )

    async def get(self, principal: Principal, cluster_id: uuid.UUID) -> ClusterDetail:
        row = await self._require(principal, cluster_id, "clusters:read")
        nodes = await self.repo.nodes([row.id], include_removed=True)
        accelerators = await self.repo.accelerators([row.id])
        history = await self.repo.history(row.id)
        base = ClusterRead.of(row, workflow_id=current_workflow_id(row))
        return ClusterDetail(
            **base.model_dump(),
            nodes=[
                NodeRead(
                    id=n.id,
                    name=n.name,
                    status=n.status,
                    reason=n.reason,
                    cpu_cores=n.cpu_cores,
                    allocatable_cpu=n.allocatable_cpu,
                    memory_mb=n.memory_mb,
                    allocatable_memory_mb=n.allocatable_memory_mb,
                    labels=n.labels,
                    last_seen_at=n.last_seen_at,
                    accelerators=[
                        AcceleratorRead.model_validate(a, from_attributes=True)
                        for a in accelerators
                        if a.node_id == n.id
                    ],
                )
                for n in nodes
            ],
            history=[
                StatusEvent(
                    status=ClusterStatus(e.status),
                    previous_status=ClusterStatus(e.previous_status) if e.previous_status else None,
                    reason=e.reason,
                    at=e.created_at,
                )
                for e in history
            ],
        )

    async def refresh(self, principal: Principal, cluster_id: uuid.UUID) -> ClusterRead:
        """Ask the cluster's monitor for an immediate check."""
        row = await self._require(principal, cluster_id, "clusters:write")
        if ClusterStatus(row.status) not in MONITORED:
            raise Conflict(f"cluster {row.name!r} is {row.status}; only watched clusters refresh")
        workflow_id = monitor_workflow_id(row.id)
        try:
            await self.client.get_workflow_handle(workflow_id).signal(REFRESH_SIGNAL)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise Conflict(
                    f"cluster {row.name!r} has no running monitor", workflow_id=workflow_id
                ) from err
            raise temporal.rpc_error(err) from err
        await self._audit(principal, "cluster.refresh", row)
        return ClusterRead.of(row, workflow_id=workflow_id)

    async def delete(
        self, principal: Principal, cluster_id: uuid.UUID, *, force: bool = False
    ) -> ClusterRead:
        row = await self._require(principal, cluster_id, "clusters:write", for_update=True)
        status = ClusterStatus(row.status)
        if status is ClusterStatus.ONBOARDING:
            raise Conflict(
                f"cluster {row.name!r} is still onboarding; cancel "
                f"{onboard_workflow_id(row.id)} first (POST /api/v1/workflows/"
                f"{onboard_workflow_id(row.id)}/cancel), which removes what it created",
                workflow_id=onboard_workflow_id(row.id),
            )
        workflow_id = delete_workflow_id(row.id)
        if status is ClusterStatus.DELETING:
            return ClusterRead.of(row, workflow_id=workflow_id)
        serving = await EndpointRepository(self.session).live_on_cluster(row.id)
        if serving:
            names = ", ".join(sorted(e.name for e in serving)[:10])
            raise Conflict(
                f"cluster {row.name!r} still runs {len(serving)} endpoint(s) ({names}); "
                "delete them first (DELETE /api/v1/endpoints/{id})",
                endpoints=[str(e.id) for e in serving],
            )
        self.repo.set_status(row, ClusterStatus.DELETING, "deletion requested")
        await self.repo.flush()
        await self._audit(principal, "cluster.delete", row, {"name": row.name, "force": force})
        request = DeleteClusterRequest(cluster=target_of(row), force=force)
        after_commit(
            self.session,
            lambda session: self._start(session, row.id, DELETE_WORKFLOW, workflow_id, request),
        )
        return ClusterRead.of(row, workflow_id=workflow_id)

    async def recommendations(self, principal: Principal, demand: Demand) -> RecommendationList:
        authorize(principal, "clusters:read", tenant_id=principal.tenant_id, what="cluster")
        candidates = await placement_candidates(self.session, principal.tenant_id)
        return RecommendationList(
            memory_mb=demand.memory_mb,
            replicas=demand.replicas,
            device=demand.device,
            items=list(rank(candidates, demand)),
        )


async def placement_candidates(session: AsyncSession, tenant_id: uuid.UUID) -> list[Candidate]:
    """The tenant's placeable clusters with their last discovered nodes."""
    repo = ClusterRepository(session)
    rows = await repo.placeable(tenant_id)
    ids = [row.id for row in rows]
    nodes = await repo.nodes(ids) if ids else []
    accelerators = await repo.accelerators(ids) if ids else []
    by_node: dict[uuid.UUID, list[Accelerator]] = {}
    for acc in accelerators:
        by_node.setdefault(acc.node_id, []).append(acc)
    return [
        Candidate(
            cluster_id=row.id,
            name=row.name,
            status=ClusterStatus(row.status),
            nodes=[node_info(n, by_node.get(n.id, [])) for n in nodes if n.cluster_id == row.id],
        )
        for row in rows
    ]


async def onboard_local_cluster(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, vault: Vault, client: Client
) -> ClusterRead | None:
    """First start of the embedded stack: onboard this machine as the bootstrap tenant's
    `local` cluster. Does nothing once the tenant has (or had) any cluster, so a deleted
    local cluster stays deleted."""
    async with session_scope(sessions) as session:
        identities = IdentityRepository(session)
        tenant = await identities.tenant_by_slug(settings.auth.bootstrap_tenant)
        if tenant is None or await ClusterRepository(session).any_cluster(tenant.id):
            return None
        admin = await identities.user_by_username(tenant.id, settings.auth.bootstrap_admin)
        principal = Principal(
            tenant_id=tenant.id,
            user_id=admin.id if admin else None,
            is_tenant_admin=True,
            username=admin.username if admin else None,
        )
        service = ClusterService(
            session, vault, client, queue_prefix=settings.temporal.task_queue_prefix
        )
        return await service.create(
            principal, LocalClusterCreate(name="local", kind=ClusterKind.LOCAL)
        )
