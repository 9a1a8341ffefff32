"""Credentials: project-scoped (`/projects/{project_id}/credentials`) and tenant-wide
(`/credentials`, written by tenant admins, shared by every project of the tenant).

Secret fields are write-only: responses carry them masked (`sk-...abcd`). Deleting a
credential destroys its secret and frees its name.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response, status

from api.deps import CurrentPrincipal, SessionDep, StateDep
from api.errors import problems
from control_plane.credentials.crypto import Vault
from control_plane.credentials.providers import Provider
from control_plane.credentials.schemas import (
    CredentialCreate,
    CredentialList,
    CredentialRead,
    CredentialUpdate,
)
from control_plane.credentials.service import CredentialService


def get_vault(state: StateDep) -> Vault:
    return state.vault


VaultDep = Annotated[Vault, Depends(get_vault)]
ProjectId = Annotated[uuid.UUID, Path()]
CredentialId = Annotated[uuid.UUID, Path()]
Sort = Literal["name", "provider", "created_at", "updated_at"]

router = APIRouter(tags=["credentials"])

PROJECT = "/api/v1/projects/{project_id}/credentials"
TENANT = "/api/v1/credentials"
READ_ERRORS = problems(401, 403, 404)
WRITE_ERRORS = problems(401, 403, 404, 409)


@router.post(
    PROJECT,
    response_model=CredentialRead,
    status_code=status.HTTP_201_CREATED,
    responses=WRITE_ERRORS,
)
async def create_project_credential(
    project_id: ProjectId,
    body: CredentialCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
) -> CredentialRead:
    """Store a credential for one project (`credentials:write`). The fields depend on
    `provider`; secret fields are encrypted and never returned."""
    return await CredentialService(session, vault).create(principal, body, project_id=project_id)


@router.get(PROJECT, response_model=CredentialList, responses=READ_ERRORS)
async def list_project_credentials(
    project_id: ProjectId,
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
    provider: Provider | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    sort: Sort = "name",
    order: Literal["asc", "desc"] = "asc",
) -> CredentialList:
    """The project's live credentials (`credentials:read`), masked."""
    return await CredentialService(session, vault).list(
        principal,
        project_id=project_id,
        provider=provider.value if provider else None,
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.get(PROJECT + "/{credential_id}", response_model=CredentialRead, responses=READ_ERRORS)
async def get_project_credential(
    project_id: ProjectId,
    credential_id: CredentialId,
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
) -> CredentialRead:
    return await CredentialService(session, vault).get(
        principal, credential_id, project_id=project_id
    )


@router.patch(
    PROJECT + "/{credential_id}",
    response_model=CredentialRead,
    responses=WRITE_ERRORS,
)
async def update_project_credential(
    project_id: ProjectId,
    credential_id: CredentialId,
    body: CredentialUpdate,
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
) -> CredentialRead:
    """Rename, change non-secret fields, or replace secret fields; only what is sent
    changes (`credentials:write`)."""
    return await CredentialService(session, vault).update(
        principal, credential_id, body, project_id=project_id
    )


@router.delete(
    PROJECT + "/{credential_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(401, 403, 404),
)
async def delete_project_credential(
    project_id: ProjectId,
    credential_id: CredentialId,
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
) -> None:
    """Mark the credential deleted and destroy its secret; its name is free again."""
    await CredentialService(session, vault).delete(principal, credential_id, project_id=project_id)


@router.post(
    TENANT,
    response_model=CredentialRead,
    status_code=status.HTTP_201_CREATED,
    responses=WRITE_ERRORS,
)
async def create_tenant_credential(
    body: CredentialCreate, principal: CurrentPrincipal, session: SessionDep, vault: VaultDep
) -> CredentialRead:
    """Store a tenant-wide credential, usable by every project (tenant admins)."""
    return await CredentialService(session, vault).create(principal, body, project_id=None)


@router.get(TENANT, response_model=CredentialList, responses=problems(401, 403))
async def list_tenant_credentials(
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
    provider: Provider | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    sort: Sort = "name",
    order: Literal["asc", "desc"] = "asc",
) -> CredentialList:
    """The tenant-wide credentials, masked (any user of the tenant may read them)."""
    return await CredentialService(session, vault).list(
        principal,
        project_id=None,
        provider=provider.value if provider else None,
        page=page,
        limit=limit,
        sort=sort,
        descending=order == "desc",
    )


@router.get(TENANT + "/{credential_id}", response_model=CredentialRead, responses=READ_ERRORS)
async def get_tenant_credential(
    credential_id: CredentialId, principal: CurrentPrincipal, session: SessionDep, vault: VaultDep
) -> CredentialRead:
    return await CredentialService(session, vault).get(principal, credential_id, project_id=None)


@router.patch(TENANT + "/{credential_id}", response_model=CredentialRead, responses=WRITE_ERRORS)
async def update_tenant_credential(
    credential_id: CredentialId,
    body: CredentialUpdate,
    principal: CurrentPrincipal,
    session: SessionDep,
    vault: VaultDep,
) -> CredentialRead:
    return await CredentialService(session, vault).update(
        principal, credential_id, body, project_id=None
    )


@router.delete(
    TENANT + "/{credential_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(401, 403, 404),
)
async def delete_tenant_credential(
    credential_id: CredentialId, principal: CurrentPrincipal, session: SessionDep, vault: VaultDep
) -> None:
    await CredentialService(session, vault).delete(principal, credential_id, project_id=None)
