"""Projects, their members, and their API keys."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Literal

from fastapi import APIRouter, status

from api.deps import CurrentPrincipal, Limit, Order, PageNo, SessionDep, StateDep
from api.errors import problems
from control_plane.core.pagination import Page
from control_plane.identity import schemas
from control_plane.identity.service import ApiKeyService, ProjectService
from control_plane.routing.changes import ChangeKind, announce_after_commit

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


@router.post(
    "",
    response_model=schemas.ProjectRead,
    status_code=status.HTTP_201_CREATED,
    responses=problems(401, 403, 409),
)
async def create_project(
    body: schemas.ProjectCreate, principal: CurrentPrincipal, session: SessionDep
) -> schemas.ProjectRead:
    """Tenant admins create projects and become their first owner."""
    return schemas.ProjectRead.model_validate(await ProjectService(session).create(principal, body))


@router.get("", response_model=Page[schemas.ProjectRead], responses=problems(401))
async def list_projects(
    principal: CurrentPrincipal,
    session: SessionDep,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Literal["name", "created_at"] = "name",
    order: Order = "asc",
) -> Page[schemas.ProjectRead]:
    """Projects the caller belongs to (every project, for tenant admins)."""
    return await ProjectService(session).list(principal, page, limit, sort, order == "desc")


@router.get("/{project_id}", response_model=schemas.ProjectRead, responses=problems(401, 404))
async def get_project(
    project_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> schemas.ProjectRead:
    return schemas.ProjectRead.model_validate(
        await ProjectService(session).get(principal, project_id)
    )


@router.patch(
    "/{project_id}", response_model=schemas.ProjectRead, responses=problems(401, 403, 404)
)
async def update_project(
    project_id: uuid.UUID,
    body: schemas.ProjectUpdate,
    principal: CurrentPrincipal,
    session: SessionDep,
) -> schemas.ProjectRead:
    project = await ProjectService(session).update(principal, project_id, body)
    return schemas.ProjectRead.model_validate(project)


@router.delete(
    "/{project_id}", response_model=schemas.ProjectRead, responses=problems(401, 403, 404)
)
async def delete_project(
    project_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep, state: StateDep
) -> schemas.ProjectRead:
    """Marks the project deleted; its API keys stop working (at the gateway too)."""
    project = await ProjectService(session).delete(principal, project_id)
    announce_after_commit(session, state.redis, ChangeKind.PROJECT, project_id)
    return schemas.ProjectRead.model_validate(project)


@router.get(
    "/{project_id}/members",
    response_model=list[schemas.MemberRead],
    responses=problems(401, 404),
)
async def list_members(
    project_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> Sequence[schemas.MemberRead]:
    return await ProjectService(session).members(principal, project_id)


@router.post(
    "/{project_id}/members",
    response_model=schemas.MemberRead,
    status_code=status.HTTP_201_CREATED,
    responses=problems(401, 403, 404, 409),
)
async def add_member(
    project_id: uuid.UUID, body: schemas.MemberAdd, principal: CurrentPrincipal, session: SessionDep
) -> schemas.MemberRead:
    return await ProjectService(session).add_member(principal, project_id, body)


@router.patch(
    "/{project_id}/members/{user_id}",
    response_model=schemas.MemberRead,
    responses=problems(401, 403, 404, 409),
)
async def update_member(
    project_id: uuid.UUID,
    user_id: uuid.UUID,
    body: schemas.MemberUpdate,
    principal: CurrentPrincipal,
    session: SessionDep,
) -> schemas.MemberRead:
    return await ProjectService(session).update_member(principal, project_id, user_id, body)


@router.delete(
    "/{project_id}/members/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problems(401, 403, 404, 409),
)
async def remove_member(
    project_id: uuid.UUID, user_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> None:
    await ProjectService(session).remove_member(principal, project_id, user_id)


@router.post(
    "/{project_id}/api-keys",
    response_model=schemas.ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
    responses=problems(400, 401, 403, 404),
)
async def create_api_key(
    project_id: uuid.UUID,
    body: schemas.ApiKeyCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    state: StateDep,
) -> schemas.ApiKeyCreated:
    """The whole key (`cpk_<prefix>_<secret>`) is in this response only."""
    created = await ApiKeyService(session).create(principal, project_id, body)
    announce_after_commit(session, state.redis, ChangeKind.API_KEY, created.id)
    return created


@router.get(
    "/{project_id}/api-keys",
    response_model=Page[schemas.ApiKeyRead],
    responses=problems(401, 404),
)
async def list_api_keys(
    project_id: uuid.UUID,
    principal: CurrentPrincipal,
    session: SessionDep,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Literal["created_at", "name", "last_used_at", "expires_at"] = "created_at",
    order: Order = "desc",
) -> Page[schemas.ApiKeyRead]:
    return await ApiKeyService(session).list(
        principal, project_id, page, limit, sort, order == "desc"
    )


@router.get(
    "/{project_id}/api-keys/{key_id}",
    response_model=schemas.ApiKeyRead,
    responses=problems(401, 404),
)
async def get_api_key(
    project_id: uuid.UUID, key_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> schemas.ApiKeyRead:
    return schemas.ApiKeyRead.model_validate(
        await ApiKeyService(session).get(principal, project_id, key_id)
    )


@router.post(
    "/{project_id}/api-keys/{key_id}/revoke",
    response_model=schemas.ApiKeyRead,
    responses=problems(401, 403, 404),
)
async def revoke_api_key(
    project_id: uuid.UUID,
    key_id: uuid.UUID,
    principal: CurrentPrincipal,
    session: SessionDep,
    state: StateDep,
) -> schemas.ApiKeyRead:
    """The key stops working at once, at the gateway too (within a second)."""
    key = await ApiKeyService(session).revoke(principal, project_id, key_id)
    announce_after_commit(session, state.redis, ChangeKind.API_KEY, key_id)
    return schemas.ApiKeyRead.model_validate(key)
