"""Models: onboard (202 + `OnboardModel` workflow), list, inspect (artifacts, scan report,
license, metadata), delete, rescan and license decisions; the tenant's license policy;
the cloud model catalog.

Follow onboarding at `/api/v1/workflows/model-onboard-{id}` or in the Temporal UI under
`CpResourceKind = 'model'`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel

from api.deps import CurrentPrincipal, Limit, Order, PageNo, SessionDep, StateDep
from api.errors import problems
from control_plane.models.schemas import (
    CatalogList,
    LicensePolicyBody,
    LicenseReviewBody,
    ModelCreate,
    ModelDetail,
    ModelList,
    ModelRead,
)
from control_plane.models.service import ListFilters, ModelService
from workflows.contracts.models import ModelStatus, SourceKind

router = APIRouter(tags=["models"])

# `{model_id:uuid}` only matches ids, so literal paths never reach per-model routes.
MODEL = "/api/v1/models/{model_id:uuid}"
ModelId = Annotated[uuid.UUID, Path()]
Sort = Literal["name", "status", "source_kind", "created_at", "updated_at"]
CatalogSort = Literal["provider", "model_id", "modality", "status"]


class WorkflowStarted(BaseModel):
    workflow_id: str


def service(state: StateDep, session: SessionDep) -> ModelService:
    return ModelService(
        session,
        state.temporal,
        objects=state.objects,
        queue_prefix=state.settings.temporal.task_queue_prefix,
        local_roots=state.settings.models.local_roots,
    )


@router.post(
    "/api/v1/models",
    response_model=ModelRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def create_model(
    body: ModelCreate, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> ModelRead:
    """Bring a model in (`models:write` on the project; tenant admins for shared models).
    `OnboardModel` resolves the source (a Hugging Face revision is pinned to its commit),
    applies the license policy, downloads every needed file into the object store, scans
    it and extracts metadata; the model ends `ready` or `quarantined`. Cloud models are
    onboarded without download or scan."""
    return await service(state, session).create(principal, body)


@router.get("/api/v1/models", response_model=ModelList, responses=problems(401, 403, 404))
async def list_models(
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    project_id: uuid.UUID | None = None,
    status: ModelStatus | None = None,
    source_kind: SourceKind | None = None,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Sort = "name",
    order: Order = "asc",
) -> ModelList:
    """Models the caller can see: its projects' and the tenant's shared ones."""
    return await service(state, session).list(
        principal,
        ListFilters(project_id=project_id, status=status, source_kind=source_kind),
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.get(MODEL, response_model=ModelDetail, responses=problems(401, 403, 404))
async def get_model(
    model_id: ModelId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> ModelDetail:
    return await service(state, session).get(principal, model_id)


@router.delete(
    MODEL,
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(401, 403, 404, 409),
)
async def delete_model(
    model_id: ModelId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> None:
    """Mark the model deleted and remove the stored files no other model shares. A model
    still onboarding is a 409: cancel its workflow instead."""
    await service(state, session).delete(principal, model_id)


@router.post(
    MODEL + "/rescan",
    response_model=ModelRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 404, 409, 503),
)
async def rescan_model(
    model_id: ModelId, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> ModelRead:
    """Scan the stored files again with the current scanner (`RescanModels`)."""
    return await service(state, session).rescan(principal, model_id)


@router.post(
    MODEL + "/license/approve",
    response_model=ModelRead,
    responses=problems(401, 403, 404, 409, 503),
)
async def approve_license(
    model_id: ModelId,
    body: LicenseReviewBody,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
) -> ModelRead:
    """Approve the license of a model `awaiting_approval` (tenant admins; a reason is
    required): sends the `approve_license` update to its onboarding workflow."""
    return await service(state, session).review_license(
        principal, model_id, approve=True, reason=body.reason
    )


@router.post(
    MODEL + "/license/reject",
    response_model=ModelRead,
    responses=problems(401, 403, 404, 409, 503),
)
async def reject_license(
    model_id: ModelId,
    body: LicenseReviewBody,
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
) -> ModelRead:
    """Reject the license: onboarding ends `failed` with the reason."""
    return await service(state, session).review_license(
        principal, model_id, approve=False, reason=body.reason
    )


@router.get("/api/v1/license-policy", response_model=LicensePolicyBody, responses=problems(401))
async def get_license_policy(
    principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> LicensePolicyBody:
    """The tenant's license policy (the default one until a tenant admin sets it)."""
    return await service(state, session).policy(principal)


@router.put(
    "/api/v1/license-policy", response_model=LicensePolicyBody, responses=problems(401, 403)
)
async def set_license_policy(
    body: LicensePolicyBody, principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> LicensePolicyBody:
    """Replace the policy (tenant admins). Entries are SPDX ids or patterns (`other:*`,
    `CC-BY-NC-*`); deny wins over allow; anything unlisted gets `default`."""
    return await service(state, session).set_policy(principal, body)


@router.get("/api/v1/catalog", response_model=CatalogList, responses=problems(401))
async def list_catalog(
    principal: CurrentPrincipal,
    state: StateDep,
    session: SessionDep,
    provider: str | None = None,
    modality: str | None = None,
    status: Literal["available", "deprecated"] | None = None,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: CatalogSort = "provider",
    order: Order = "asc",
) -> CatalogList:
    """Cloud models the tenant can onboard, with context windows and prices."""
    return await service(state, session).catalog(
        principal,
        provider=provider,
        modality=modality,
        status=status,
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.post(
    "/api/v1/catalog/sync",
    response_model=WorkflowStarted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=problems(401, 403, 503),
)
async def sync_catalog(
    principal: CurrentPrincipal, state: StateDep, session: SessionDep
) -> WorkflowStarted:
    """Run `SyncCloudModels` for this tenant now (the `cloud-model-sync` schedule runs it
    daily for every tenant)."""
    return WorkflowStarted(workflow_id=await service(state, session).sync_catalog(principal))
