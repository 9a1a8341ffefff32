"""Endpoints: create (starts `DeployEndpoint`), read, autoscale, scale, logs, delete.

Endpoints belong to a project: its viewers read them, members write them. Everything
that changes a running endpoint goes through its workflow (`endpoint-{id}`): the
`set_autoscale` update (the workflow validates and answers), the `scale` signal, the
`delete` update. The workflow mirrors what it sees into the rows this service reads.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowUpdateFailedError, WorkflowUpdateStage
from temporalio.service import RPCError, RPCStatusCode

from control_plane.audit import service as audit
from control_plane.clusters.providers.base import ProviderError, ReplicaNotFound
from control_plane.clusters.providers.kubernetes import KubernetesProvider
from control_plane.clusters.providers.local import LocalProvider
from control_plane.clusters.repository import ClusterRepository
from control_plane.core import temporal
from control_plane.core.db import after_commit
from control_plane.core.errors import Conflict, ControlPlaneError, DependencyUnavailable, NotFound
from control_plane.core.logging import get_logger
from control_plane.core.pagination import paginate
from control_plane.credentials.crypto import Vault
from control_plane.credentials.errors import InvalidFields
from control_plane.credentials.service import reveal
from control_plane.endpoints.engines.base import EngineArgsError, engine_for, parse_args
from control_plane.endpoints.repository import SORTABLE, EndpointRepository
from control_plane.endpoints.schemas import (
    AutoscalePatch,
    EndpointCreate,
    EndpointDetail,
    EndpointList,
    EndpointLogs,
    EndpointRead,
    ReplicaRead,
    ScaleBody,
    ScalingEventRead,
)
from control_plane.endpoints.tables import Endpoint
from control_plane.identity.permissions import Principal, authorize
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import ProjectStatus
from control_plane.models.repository import ModelRepository
from control_plane.routing.repository import RouterRepository, lock_name
from control_plane.workflow_runs.service import WorkflowRunService
from workflows.contracts.autoscale import AutoscalePolicy
from workflows.contracts.clusters import ClusterKind, ClusterStatus
from workflows.contracts.common import ResourceRef
from workflows.contracts.endpoints import (
    DELETE_UPDATE,
    SCALE_SIGNAL,
    SET_AUTOSCALE_UPDATE,
    DeleteEndpointRequest,
    DeployEndpointRequest,
    EndpointStatus,
    EndpointTarget,
    ScaleRequest,
    endpoint_workflow_id,
    replica_set_name,
)
from workflows.contracts.models import ModelStatus, SourceKind

log = get_logger(__name__)

RESOURCE_KIND = "endpoint"
DEPLOY_WORKFLOW = "DeployEndpoint"
# Statuses in which the workflow is expected to be running.
MANAGED = (
    EndpointStatus.PENDING,
    EndpointStatus.DEPLOYING,
    EndpointStatus.RUNNING,
    EndpointStatus.DEGRADED,
    EndpointStatus.IDLE,
)
MAX_LOG_TAIL = 10_000


def resource_of(row: Endpoint) -> ResourceRef:
    return ResourceRef(
        kind=RESOURCE_KIND, id=str(row.id), tenant_id=row.tenant_id, project_id=row.project_id
    )


def _invalid(field: str, message: str) -> InvalidFields:
    return InvalidFields(
        f"body.{field}: {message}",
        errors=[{"loc": ["body", field], "msg": message, "type": "value_error"}],
    )


@dataclass(frozen=True)
class ListFilters:
    project_id: uuid.UUID | None = None
    status: EndpointStatus | None = None
    include_deleted: bool = False


class EndpointService:
    def __init__(
        self,
        session: AsyncSession,
        client: Client,
        *,
        vault: Vault | None = None,
        queue_prefix: str = "",
        replicas_dir: Path | None = None,
    ) -> None:
        self.session = session
        self.repo = EndpointRepository(session)
        self.client = client
        self.vault = vault
        self.queue_prefix = queue_prefix
        self.replicas_dir = replicas_dir

    async def _project(self, principal: Principal, project_id: uuid.UUID, scope: str) -> None:
        project = await IdentityRepository(self.session).project(project_id)
        if (
            project is None
            or project.status != ProjectStatus.ACTIVE.value
            or project.tenant_id != principal.tenant_id
        ):
            raise NotFound("project not found")
        authorize(
            principal, scope, tenant_id=project.tenant_id, project_id=project.id, what="project"
        )

    async def _require(
        self, principal: Principal, endpoint_id: uuid.UUID, scope: str, *, for_update: bool = False
    ) -> Endpoint:
        row = await self.repo.get(endpoint_id, for_update=for_update)
        if row is None or row.status == EndpointStatus.DELETED.value:
            raise NotFound("endpoint not found")
        if row.tenant_id != principal.tenant_id:
            raise NotFound("endpoint not found")
        authorize(
            principal, scope, tenant_id=row.tenant_id, project_id=row.project_id, what="endpoint"
        )
        return row

    async def _audit(
        self, principal: Principal, action: str, row: Endpoint, details: dict[str, Any] | None
    ) -> None:
        await audit.record(
            self.session,
            actor=principal,
            action=action,
            resource_kind=RESOURCE_KIND,
            resource_id=row.id,
            tenant_id=row.tenant_id,
            project_id=row.project_id,
            details=details,
        )

    # --- create ---------------------------------------------------------------------

    async def _check_model(self, principal: Principal, body: EndpointCreate) -> None:
        engine = engine_for(body.engine)
        if body.model_id is None:
            if engine.needs_model:
                raise _invalid("model_id", f"the {body.engine.value} engine needs a model")
            return
        model = await ModelRepository(self.session).get(body.model_id)
        if (
            model is None
            or model.status == ModelStatus.DELETED.value
            or model.tenant_id != principal.tenant_id
            or model.project_id not in (None, body.project_id)
        ):
            raise NotFound(f"model {body.model_id} not found in the project or tenant")
        if model.source_kind == SourceKind.CLOUD.value:
            raise _invalid(
                "model_id",
                "cloud models are served by their provider; route to them through the "
                "gateway instead of deploying them",
            )
        status = ModelStatus(model.status)
        if status is ModelStatus.QUARANTINED:
            raise Conflict(
                f"model {model.name!r} is quarantined and cannot be deployed: {model.status_reason}"
            )
        if status is not ModelStatus.READY:
            raise Conflict(f"model {model.name!r} is {status.value}; only ready models deploy")

    async def _check_cluster(self, principal: Principal, cluster_id: uuid.UUID | None) -> None:
        if cluster_id is None:
            return
        cluster = await ClusterRepository(self.session).get(cluster_id)
        if cluster is None or cluster.tenant_id != principal.tenant_id:
            raise NotFound(f"cluster {cluster_id} not found")
        status = ClusterStatus(cluster.status)
        if status not in (ClusterStatus.AVAILABLE, ClusterStatus.DEGRADED):
            raise Conflict(
                f"cluster {cluster.name!r} is {status.value}; only available or degraded "
                "clusters take new endpoints"
            )

    async def create(self, principal: Principal, body: EndpointCreate) -> EndpointRead:
        await self._project(principal, body.project_id, "endpoints:write")
        try:
            parse_args(body.engine, body.engine_args)
        except EngineArgsError as err:
            raise _invalid("engine_args", str(err)) from None
        policy = body.autoscale
        if policy is None:
            fixed = 1 if body.replicas is None else body.replicas
            policy = AutoscalePolicy(min_replicas=fixed, max_replicas=max(fixed, 1))
        initial = max(policy.min_replicas, 1) if body.replicas is None else body.replicas
        if not policy.min_replicas <= initial <= policy.max_replicas:
            raise _invalid(
                "replicas",
                f"{initial} is outside the autoscale range "
                f"[{policy.min_replicas}, {policy.max_replicas}]",
            )
        # Routers and endpoints share one namespace per project (the gateway's `model`
        # names either); the lock makes the two checks one against concurrent creators.
        await lock_name(self.session, body.project_id, body.name)
        if await self.repo.name_taken(body.project_id, body.name):
            raise Conflict(f"an endpoint named {body.name!r} already exists", name=body.name)
        if await RouterRepository(self.session).name_taken(body.project_id, body.name):
            raise Conflict(
                f"a router named {body.name!r} already exists in the project; routers and "
                "endpoints share one namespace (clients send either name as `model`)",
                name=body.name,
            )
        await self._check_model(principal, body)
        await self._check_cluster(principal, body.cluster_id)
        row = Endpoint(
            tenant_id=principal.tenant_id,
            project_id=body.project_id,
            name=body.name,
            description=body.description,
            model_id=body.model_id,
            requested_cluster_id=body.cluster_id,
            cluster_id=body.cluster_id,
            engine=body.engine.value,
            engine_args=body.engine_args,
            context_length=body.context_length,
            status=EndpointStatus.PENDING.value,
            autoscale=policy.model_dump(mode="json"),
            replicas_desired=initial,
            created_by=principal.user_id,
        )
        self.session.add(row)
        await self.session.flush()
        await self._audit(
            principal,
            "endpoint.create",
            row,
            {"name": row.name, "engine": row.engine, "replicas": initial},
        )
        request = DeployEndpointRequest(
            target=EndpointTarget(
                endpoint_id=row.id,
                tenant_id=row.tenant_id,
                project_id=row.project_id,
                cluster_id=body.cluster_id,
            ),
            initial_replicas=initial,
            autoscale=policy,
            reconcile_interval_s=body.reconcile_interval_s,
        )
        after_commit(self.session, lambda session: self._start(session, row.id, request))
        return EndpointRead.of(row)

    async def _start(
        self, session: AsyncSession, endpoint_id: uuid.UUID, request: DeployEndpointRequest
    ) -> None:
        row = await EndpointRepository(session).get(endpoint_id)
        assert row is not None
        try:
            handle = await temporal.start_workflow(
                self.client,
                DEPLOY_WORKFLOW,
                request,
                workflow_id=endpoint_workflow_id(row.id),
                resource=resource_of(row),
                queue_prefix=self.queue_prefix,
            )
            await WorkflowRunService(session, self.client).record_started(
                handle, DEPLOY_WORKFLOW, resource_of(row)
            )
        except (ControlPlaneError, RPCError) as err:
            log.warning("endpoints.workflow.start_failed", endpoint_id=str(row.id), error=str(err))
            row.status = EndpointStatus.FAILED.value
            row.status_reason = f"could not start {DEPLOY_WORKFLOW}: {err}"
            session.add(row)
            raise

    # --- reads ----------------------------------------------------------------------

    async def list(
        self,
        principal: Principal,
        filters: ListFilters,
        *,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> EndpointList:
        if filters.project_id is not None:
            await self._project(principal, filters.project_id, "endpoints:read")
        else:
            authorize(principal, "endpoints:read", tenant_id=principal.tenant_id, what="endpoint")
        assert sort in SORTABLE
        visible = principal.visible_projects()
        query = self.repo.listing(
            principal.tenant_id,
            None if visible is None else sorted(visible),
            project_id=filters.project_id,
            status=filters.status.value if filters.status else None,
            include_deleted=filters.include_deleted,
        )
        page_ = await paginate(
            self.session,
            query,
            Endpoint,
            EndpointRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
            convert=EndpointRead.of,
        )
        return EndpointList(**page_.model_dump())

    async def get(self, principal: Principal, endpoint_id: uuid.UUID) -> EndpointDetail:
        row = await self._require(principal, endpoint_id, "endpoints:read")
        return EndpointDetail(
            **EndpointRead.of(row).model_dump(),
            replicas=[ReplicaRead.of(r) for r in await self.repo.replicas(row.id)],
            scaling_events=[ScalingEventRead.of(e) for e in await self.repo.events(row.id)],
        )

    # --- changes through the workflow -----------------------------------------------

    def _managed(self, row: Endpoint) -> str:
        if EndpointStatus(row.status) not in MANAGED:
            raise Conflict(f"endpoint {row.name!r} is {row.status}; it cannot change now")
        return endpoint_workflow_id(row.id)

    async def set_autoscale(
        self, principal: Principal, endpoint_id: uuid.UUID, patch: AutoscalePatch
    ) -> EndpointRead:
        row = await self._require(principal, endpoint_id, "endpoints:write")
        workflow_id = self._managed(row)
        merged = {**row.autoscale, **patch.model_dump(exclude_unset=True)}
        try:
            policy = AutoscalePolicy.model_validate(merged)
        except ValidationError as err:
            problems = "; ".join(e["msg"] for e in err.errors(include_url=False))
            raise Conflict(f"the resulting autoscale policy is invalid: {problems}") from None
        try:
            await self.client.get_workflow_handle(workflow_id).execute_update(
                SET_AUTOSCALE_UPDATE, policy, result_type=AutoscalePolicy
            )
        except WorkflowUpdateFailedError as err:
            raise Conflict(f"the endpoint refused the policy: {err.cause}") from err
        except RPCError as err:
            raise self._rpc(err, row) from err
        row.autoscale = policy.model_dump(mode="json")
        self.session.add(row)
        await self._audit(principal, "endpoint.autoscale", row, row.autoscale)
        return EndpointRead.of(row)

    async def scale(
        self, principal: Principal, endpoint_id: uuid.UUID, body: ScaleBody
    ) -> EndpointRead:
        row = await self._require(principal, endpoint_id, "endpoints:write")
        workflow_id = self._managed(row)
        policy = AutoscalePolicy.model_validate(row.autoscale)
        if body.replicas is not None and body.replicas > policy.max_replicas:
            raise _invalid(
                "replicas",
                f"{body.replicas} is above the autoscale maximum ({policy.max_replicas}); "
                "raise it first with PATCH /autoscale",
            )
        try:
            await self.client.get_workflow_handle(workflow_id).signal(
                SCALE_SIGNAL, ScaleRequest(replicas=body.replicas)
            )
        except RPCError as err:
            raise self._rpc(err, row) from err
        row.manual_replicas = body.replicas
        self.session.add(row)
        await self._audit(principal, "endpoint.scale", row, {"replicas": body.replicas})
        return EndpointRead.of(row)

    async def delete(
        self, principal: Principal, endpoint_id: uuid.UUID, *, grace_s: float
    ) -> EndpointRead:
        row = await self._require(principal, endpoint_id, "endpoints:write", for_update=True)
        status = EndpointStatus(row.status)
        if status is EndpointStatus.DELETING:
            return EndpointRead.of(row)
        await self._audit(principal, "endpoint.delete", row, {"name": row.name})
        if status is EndpointStatus.FAILED:
            # Its workflow already removed the replicas when it failed.
            row.status = EndpointStatus.DELETED.value
            row.status_reason = "deleted"
            row.published = False
            self.session.add(row)
            return EndpointRead.of(row)
        row.status = EndpointStatus.DELETING.value
        row.status_reason = "deletion requested"
        row.published = False
        row.routing_version += 1
        self.session.add(row)
        workflow_id = endpoint_workflow_id(row.id)

        async def send(session: AsyncSession) -> None:
            try:
                await self.client.get_workflow_handle(workflow_id).start_update(
                    DELETE_UPDATE,
                    DeleteEndpointRequest(grace_s=grace_s),
                    wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                    result_type=EndpointStatus,
                )
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise temporal.rpc_error(err) from err
                # No workflow (it never started, or was terminated): nothing runs for
                # this endpoint that the control plane knows of.
                stored = await EndpointRepository(session).get(row.id)
                if stored is not None:
                    stored.status = EndpointStatus.DELETED.value
                    stored.status_reason = "deleted (its workflow was not running)"
                    session.add(stored)

        after_commit(self.session, send)
        return EndpointRead.of(row)

    def _rpc(self, err: RPCError, row: Endpoint) -> Exception:
        if err.status == RPCStatusCode.NOT_FOUND:
            return Conflict(
                f"endpoint {row.name!r} has no running workflow",
                workflow_id=endpoint_workflow_id(row.id),
            )
        return temporal.rpc_error(err)

    # --- logs -----------------------------------------------------------------------

    async def logs(
        self, principal: Principal, endpoint_id: uuid.UUID, replica: str | None, tail: int
    ) -> EndpointLogs:
        row = await self._require(principal, endpoint_id, "endpoints:read")
        if row.cluster_id is None:
            return EndpointLogs(replicas={})
        cluster = await ClusterRepository(self.session).get(row.cluster_id)
        if cluster is None:
            return EndpointLogs(replicas={})
        name = replica_set_name(row.id)
        tail = max(1, min(tail, MAX_LOG_TAIL))
        try:
            if ClusterKind(cluster.kind) is ClusterKind.LOCAL:
                local = LocalProvider(replicas_dir=self.replicas_dir)
                return EndpointLogs(replicas=await local.replica_logs(name, replica, tail))
            kubeconfig: str | None = None
            if cluster.credential_id is not None and self.vault is not None:
                fields = await reveal(
                    self.session, self.vault, cluster.credential_id, tenant_id=cluster.tenant_id
                )
                kubeconfig = str(fields["kubeconfig"])
            if kubeconfig is None:
                kube = KubernetesProvider.in_cluster(
                    cluster_id=cluster.id, namespace=cluster.namespace
                )
            else:
                kube = KubernetesProvider.from_kubeconfig(
                    kubeconfig, cluster_id=cluster.id, namespace=cluster.namespace
                )
            try:
                return EndpointLogs(replicas=await kube.replica_logs(name, replica, tail))
            finally:
                kube.close()
        except ReplicaNotFound as err:
            raise NotFound(str(err)) from None
        except ProviderError as err:
            raise DependencyUnavailable(
                f"cannot read logs from cluster {cluster.name!r}: {err}", dependency="cluster"
            ) from None
