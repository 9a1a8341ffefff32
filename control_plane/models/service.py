"""Models: onboarding, reads, deletion, rescans, license decisions, the tenant's license
policy and the cloud catalog, with permission checks.

A model belongs to a project (project roles apply) or to the whole tenant (tenant admins
write it, every user reads it). Workflows start after the request's transaction commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from control_plane.audit import service as audit
from control_plane.core import temporal
from control_plane.core.db import after_commit
from control_plane.core.errors import Conflict, ControlPlaneError, Forbidden, NotFound
from control_plane.core.logging import get_logger
from control_plane.core.pagination import paginate
from control_plane.core.storage import ObjectStore
from control_plane.credentials.errors import InvalidFields
from control_plane.credentials.repository import CredentialRepository
from control_plane.endpoints.repository import EndpointRepository
from control_plane.identity.permissions import Principal, authorize
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import ProjectStatus
from control_plane.models.repository import ModelRepository
from control_plane.models.schemas import (
    ArtifactRead,
    CatalogList,
    CatalogRead,
    CloudModelCreate,
    LicensePolicyBody,
    LicenseRead,
    ModelDetail,
    ModelList,
    ModelRead,
    S3ModelCreate,
    ScanReportRead,
)
from control_plane.models.tables import CatalogModel, LicensePolicy, Model
from control_plane.workflow_runs.service import WorkflowRunService
from workflows.contracts.common import ResourceRef
from workflows.contracts.models import (
    APPROVE_LICENSE_UPDATE,
    REJECT_LICENSE_UPDATE,
    CatalogSyncRequest,
    Finding,
    LicenseDecision,
    LicenseReview,
    ModelMetadataInfo,
    ModelRef,
    ModelStatus,
    OnboardModelRequest,
    RescanRequest,
    SourceKind,
    Verdict,
    onboard_model_workflow_id,
    rescan_workflow_id,
)

log = get_logger(__name__)

RESOURCE_KIND = "model"
ONBOARD_WORKFLOW = "OnboardModel"
RESCAN_WORKFLOW = "RescanModels"
SYNC_WORKFLOW = "SyncCloudModels"
# Which credential provider each source takes.
CREDENTIAL_PROVIDERS: dict[SourceKind, set[str]] = {
    SourceKind.HUGGINGFACE: {"huggingface"},
    SourceKind.S3: {"aws"},
    SourceKind.URL: set(),
    SourceKind.LOCAL: set(),
    SourceKind.CLOUD: {"openai", "anthropic", "azure_openai"},
}


def model_ref(row: Model) -> ModelRef:
    return ModelRef(model_id=row.id, tenant_id=row.tenant_id, project_id=row.project_id)


def resource_of(row: Model) -> ResourceRef:
    return ResourceRef(
        kind=RESOURCE_KIND, id=str(row.id), tenant_id=row.tenant_id, project_id=row.project_id
    )


def current_workflow_id(row: Model) -> str | None:
    status = ModelStatus(row.status)
    if status in (ModelStatus.ONBOARDING, ModelStatus.AWAITING_APPROVAL):
        return onboard_model_workflow_id(row.id)
    return None


def check_local_root(path: str, roots: list[Path]) -> None:
    """A local source must lie under one of the configured roots (after resolving
    links), or a tenant could read any file the model workers can."""
    if not roots:
        raise LocalSourceRefused(
            "local model sources are disabled; an operator enables them for chosen "
            "directories with CP_MODELS__LOCAL_ROOTS"
        )
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise LocalSourceRefused(f"{path} is outside the allowed local roots ({allowed})")


class LocalSourceRefused(ValueError):
    pass


@dataclass(frozen=True)
class ListFilters:
    project_id: uuid.UUID | None = None
    status: ModelStatus | None = None
    source_kind: SourceKind | None = None


class ModelService:
    def __init__(
        self,
        session: AsyncSession,
        client: Client,
        *,
        objects: ObjectStore | None = None,
        queue_prefix: str = "",
        local_roots: list[Path] | None = None,
    ) -> None:
        self.local_roots = local_roots or []
        self.session = session
        self.repo = ModelRepository(session)
        self.client = client
        self.objects = objects
        self.queue_prefix = queue_prefix

    async def _authorize_scope(
        self, principal: Principal, scope: str, project_id: uuid.UUID | None
    ) -> None:
        if project_id is None:
            authorize(principal, scope, tenant_id=principal.tenant_id, what="model")
            return
        project = await IdentityRepository(self.session).project(project_id)
        if project is None or project.status != ProjectStatus.ACTIVE.value:
            raise NotFound("project not found")
        authorize(
            principal, scope, tenant_id=project.tenant_id, project_id=project.id, what="project"
        )

    async def _require(
        self, principal: Principal, model_id: uuid.UUID, scope: str, *, for_update: bool = False
    ) -> Model:
        row = await self.repo.get(model_id, for_update=for_update)
        if row is None or row.status == ModelStatus.DELETED.value:
            raise NotFound("model not found")
        if row.tenant_id != principal.tenant_id:
            raise NotFound("model not found")
        if row.project_id is None:
            authorize(principal, scope, tenant_id=row.tenant_id, what="model")
        else:
            authorize(
                principal, scope, tenant_id=row.tenant_id, project_id=row.project_id, what="model"
            )
        return row

    async def _audit(
        self, principal: Principal, action: str, row: Model, details: dict[str, Any] | None = None
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

    async def _check_credential(self, principal: Principal, body: Any, kind: SourceKind) -> None:
        credential_id: uuid.UUID | None = body.credential_id
        if credential_id is None:
            return
        repo = CredentialRepository(self.session)
        credential = await repo.live(principal.tenant_id, body.project_id, credential_id)
        if credential is None and body.project_id is not None:
            credential = await repo.live(principal.tenant_id, None, credential_id)
        if credential is None:
            raise NotFound(f"credential {credential_id} not found")
        allowed = CREDENTIAL_PROVIDERS[kind]
        if kind is SourceKind.CLOUD:
            allowed = {str(body.source_ref).split("/", 1)[0]}
        if credential.provider not in allowed:
            wanted = " or ".join(sorted(allowed)) or "no"
            raise _invalid(
                "credential_id",
                f"credential {credential.name!r} is a {credential.provider} credential; "
                f"a {kind.value} source takes {wanted} credentials",
            )

    async def create(self, principal: Principal, body: Any) -> ModelRead:
        kind = SourceKind(body.source_kind)
        await self._authorize_scope(principal, "models:write", body.project_id)
        if await self.repo.name_taken(principal.tenant_id, body.project_id, body.name):
            raise Conflict(f"a model named {body.name!r} already exists", name=body.name)
        await self._check_credential(principal, body, kind)
        if kind is SourceKind.LOCAL:
            try:
                check_local_root(body.source_ref, self.local_roots)
            except LocalSourceRefused as err:
                raise Forbidden(str(err)) from None
        options: dict[str, Any] = {}
        modality: str | None = None
        endpoints: list[str] = []
        if isinstance(body, S3ModelCreate):
            options = {"endpoint": body.endpoint, "region": body.region}
        if isinstance(body, CloudModelCreate):
            provider, _, model_name = body.source_ref.partition("/")
            entry = await self.repo.catalog_entry(principal.tenant_id, provider, model_name)
            if entry is None or entry.status != "available":
                raise NotFound(
                    f"{body.source_ref} is not an available model of the catalog "
                    "(GET /api/v1/catalog; POST /api/v1/catalog/sync refreshes it)"
                )
            modality, endpoints = entry.modality, list(entry.endpoints)
        row = Model(
            tenant_id=principal.tenant_id,
            project_id=body.project_id,
            name=body.name,
            source_kind=kind.value,
            source_ref=body.source_ref,
            revision=getattr(body, "revision", None),
            credential_id=body.credential_id,
            source_options=options,
            status=ModelStatus.ONBOARDING.value,
            modality=modality,
            endpoints=endpoints,
            created_by=principal.user_id,
        )
        self.session.add(row)
        await self.session.flush()
        await self._audit(
            principal, "model.create", row, {"name": row.name, "source": f"{kind}:{row.source_ref}"}
        )
        request = OnboardModelRequest(model=model_ref(row), source_kind=kind)
        workflow_id = onboard_model_workflow_id(row.id)
        after_commit(
            self.session,
            lambda session: self._start(session, row.id, ONBOARD_WORKFLOW, workflow_id, request),
        )
        return ModelRead.of(row, workflow_id=workflow_id)

    async def _start(
        self,
        session: AsyncSession,
        model_id: uuid.UUID,
        workflow: str,
        workflow_id: str,
        payload: Any,
    ) -> None:
        repo = ModelRepository(session)
        row = await repo.get(model_id)
        assert row is not None
        try:
            handle = await temporal.start_workflow(
                self.client,
                workflow,
                payload,
                workflow_id=workflow_id,
                resource=resource_of(row),
                queue_prefix=self.queue_prefix,
            )
            await WorkflowRunService(session, self.client).record_started(
                handle, workflow, resource_of(row)
            )
        except (ControlPlaneError, RPCError) as err:
            log.warning("models.workflow.start_failed", workflow_id=workflow_id, error=err.message)
            if workflow == ONBOARD_WORKFLOW:
                row.status = ModelStatus.FAILED.value
                row.status_reason = f"could not start {workflow}: {err.message}"
                session.add(row)
            raise

    async def list(
        self,
        principal: Principal,
        filters: ListFilters,
        *,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> ModelList:
        if filters.project_id is not None:
            await self._authorize_scope(principal, "models:read", filters.project_id)
        else:
            authorize(principal, "models:read", tenant_id=principal.tenant_id, what="model")
        query = self.repo.listing(
            principal.tenant_id,
            principal.visible_projects(),
            project_id=filters.project_id,
            status=filters.status,
            source_kind=filters.source_kind.value if filters.source_kind else None,
        )
        return await paginate(
            self.session,
            query,
            Model,
            ModelRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
            convert=lambda row: ModelRead.of(row, workflow_id=current_workflow_id(row)),
        )

    async def get(self, principal: Principal, model_id: uuid.UUID) -> ModelDetail:
        row = await self._require(principal, model_id, "models:read")
        scan = await self.repo.latest_scan(row.id)
        license_row = await self.repo.license(row.id)
        metadata = await self.repo.metadata(row.id)
        base = ModelRead.of(row, workflow_id=current_workflow_id(row))
        return ModelDetail(
            **base.model_dump(),
            artifacts=[ArtifactRead.model_validate(a) for a in await self.repo.artifacts(row.id)],
            scan=ScanReportRead(
                scanner=scan.scanner,
                version=scan.version,
                verdict=Verdict(scan.verdict),
                findings=[Finding.model_validate(f) for f in scan.findings],
                files_scanned=scan.files_scanned,
                bytes_scanned=scan.bytes_scanned,
                scanned_at=scan.created_at,
            )
            if scan
            else None,
            license=LicenseRead.model_validate(license_row) if license_row else None,
            metadata=ModelMetadataInfo.model_validate(metadata.details) if metadata else None,
        )

    async def delete(self, principal: Principal, model_id: uuid.UUID) -> None:
        row = await self._require(principal, model_id, "models:write", for_update=True)
        if ModelStatus(row.status) in (ModelStatus.ONBOARDING, ModelStatus.AWAITING_APPROVAL):
            workflow_id = onboard_model_workflow_id(row.id)
            raise Conflict(
                f"model {row.name!r} is still onboarding; cancel {workflow_id} first "
                f"(POST /api/v1/workflows/{workflow_id}/cancel), which removes what it stored",
                workflow_id=workflow_id,
            )
        serving = await EndpointRepository(self.session).live_for_model(row.id)
        if serving:
            names = ", ".join(sorted(e.name for e in serving)[:10])
            raise Conflict(
                f"model {row.name!r} is deployed by {len(serving)} endpoint(s) ({names}); "
                "delete them first",
                endpoints=[str(e.id) for e in serving],
            )
        row.status = ModelStatus.DELETED.value
        row.status_reason = "deleted"
        self.session.add(row)
        unused = await self.repo.drop_artifacts(row.id)
        await self._audit(principal, "model.delete", row, {"name": row.name})
        objects = self.objects
        if objects is not None and unused:

            async def remove(session: AsyncSession) -> None:
                repo = ModelRepository(session)
                for key in unused:
                    # A new onboarding may have stored the same content meanwhile.
                    if not await repo.object_in_use(key):
                        await objects.delete(key)

            after_commit(self.session, remove)

    async def rescan(self, principal: Principal, model_id: uuid.UUID) -> ModelRead:
        row = await self._require(principal, model_id, "models:write")
        if ModelStatus(row.status) not in (ModelStatus.READY, ModelStatus.QUARANTINED):
            raise Conflict(f"model {row.name!r} is {row.status}; only stored models rescan")
        if row.source_kind == SourceKind.CLOUD.value:
            raise Conflict("cloud models have no files to scan")
        workflow_id = rescan_workflow_id(row.id)
        await self._audit(principal, "model.rescan", row)
        request = RescanRequest(model_ids=[row.id], force=True)
        after_commit(
            self.session,
            lambda session: self._start(session, row.id, RESCAN_WORKFLOW, workflow_id, request),
        )
        return ModelRead.of(row, workflow_id=workflow_id)

    async def review_license(
        self, principal: Principal, model_id: uuid.UUID, *, approve: bool, reason: str
    ) -> ModelRead:
        row = await self._require(principal, model_id, "models:read")
        if not principal.is_tenant_admin:
            raise Forbidden("only a tenant admin may decide on a license")
        if row.status != ModelStatus.AWAITING_APPROVAL.value:
            raise Conflict(f"model {row.name!r} is {row.status}, not awaiting_approval")
        workflow_id = onboard_model_workflow_id(row.id)
        review = LicenseReview(
            reason=reason,
            actor_id=principal.actor_id,
            actor_is_tenant_admin=principal.is_tenant_admin,
            actor_name=principal.username,
        )
        update = APPROVE_LICENSE_UPDATE if approve else REJECT_LICENSE_UPDATE
        try:
            await self.client.get_workflow_handle(workflow_id).execute_update(
                update, review, result_type=str
            )
        except WorkflowUpdateFailedError as err:
            raise Conflict(f"{update} refused: {err.cause or err}") from err
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise Conflict(f"{workflow_id} is not running") from err
            raise temporal.rpc_error(err) from err
        await self._audit(
            principal,
            "model.license.approve" if approve else "model.license.reject",
            row,
            {"reason": reason},
        )
        return ModelRead.of(row, workflow_id=workflow_id)

    async def policy(self, principal: Principal) -> LicensePolicyBody:
        authorize(principal, "models:read", tenant_id=principal.tenant_id, what="license policy")
        row = await self.repo.policy(principal.tenant_id)
        if row is None:
            from control_plane.models.licenses import DEFAULT_POLICY

            return LicensePolicyBody.model_validate(DEFAULT_POLICY.model_dump())
        return LicensePolicyBody(
            allow=row.allow,
            deny=row.deny,
            require_approval=row.require_approval,
            default=LicenseDecision(row.default),
        )

    async def set_policy(self, principal: Principal, body: LicensePolicyBody) -> LicensePolicyBody:
        authorize(principal, "models:write", tenant_id=principal.tenant_id, what="license policy")
        from control_plane.models.licenses import normalise_license

        def normalised(items: list[str]) -> list[str]:
            return [item if "*" in item else normalise_license(item) for item in items]

        row = await self.repo.policy(principal.tenant_id) or LicensePolicy(
            tenant_id=principal.tenant_id
        )
        row.allow = normalised(body.allow)
        row.deny = normalised(body.deny)
        row.require_approval = normalised(body.require_approval)
        row.default = body.default.value
        self.session.add(row)
        await audit.record(
            self.session,
            actor=principal,
            action="license_policy.update",
            resource_kind="license_policy",
            resource_id=principal.tenant_id,
            tenant_id=principal.tenant_id,
            details={"allow": row.allow, "deny": row.deny, "default": row.default},
        )
        return LicensePolicyBody(
            allow=row.allow,
            deny=row.deny,
            require_approval=row.require_approval,
            default=body.default,
        )

    async def catalog(
        self,
        principal: Principal,
        *,
        provider: str | None,
        modality: str | None,
        status: str | None,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> CatalogList:
        authorize(principal, "models:read", tenant_id=principal.tenant_id, what="catalog")
        query = self.repo.catalog_listing(
            principal.tenant_id, provider=provider, modality=modality, status=status
        )
        return await paginate(
            self.session,
            query,
            CatalogModel,
            CatalogRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
        )

    async def sync_catalog(self, principal: Principal) -> str:
        authorize(principal, "models:write", tenant_id=principal.tenant_id, what="catalog")
        workflow_id = f"cloud-model-sync-{principal.tenant_id}"
        resource = ResourceRef(kind="catalog", tenant_id=principal.tenant_id)
        handle = await temporal.start_workflow(
            self.client,
            SYNC_WORKFLOW,
            CatalogSyncRequest(tenant_ids=[principal.tenant_id]),
            workflow_id=workflow_id,
            resource=resource,
            queue_prefix=self.queue_prefix,
            ensure=True,
        )
        await WorkflowRunService(self.session, self.client).record_started(
            handle, SYNC_WORKFLOW, resource
        )
        await audit.record(
            self.session,
            actor=principal,
            action="catalog.sync",
            resource_kind="catalog",
            tenant_id=principal.tenant_id,
        )
        return workflow_id


def _invalid(field: str, message: str) -> InvalidFields:
    return InvalidFields(
        message, errors=[{"loc": ["body", field], "msg": message, "type": "value_error"}]
    )
