"""Tenants and users."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, status

from api.deps import (
    CurrentPrincipal,
    Limit,
    Order,
    PageNo,
    RealmAdminDep,
    SessionDep,
    SettingsDep,
)
from api.errors import problems
from control_plane.core.pagination import Page
from control_plane.identity import schemas
from control_plane.identity.service import TenantService, UserService
from control_plane.identity.tables import UserStatus

router = APIRouter(prefix="/api/v1", tags=["tenants and users"])


@router.post(
    "/tenants",
    response_model=schemas.TenantCreated,
    status_code=status.HTTP_201_CREATED,
    responses=problems(401, 403, 409),
)
async def create_tenant(
    body: schemas.TenantCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> schemas.TenantCreated:
    """Create a tenant and its first admin (one-time password in the response)."""
    return await TenantService(session, settings).create(principal, body)


@router.get("/tenants", response_model=Page[schemas.TenantRead], responses=problems(401))
async def list_tenants(
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Literal["slug", "display_name", "created_at"] = "slug",
    order: Order = "asc",
) -> Page[schemas.TenantRead]:
    return await TenantService(session, settings).list(
        principal, page, limit, sort, order == "desc"
    )


@router.get("/tenants/{tenant_id}", response_model=schemas.TenantRead, responses=problems(401, 404))
async def get_tenant(
    tenant_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> schemas.TenantRead:
    return schemas.TenantRead.model_validate(
        await TenantService(session, settings).get(principal, tenant_id)
    )


@router.patch(
    "/tenants/{tenant_id}",
    response_model=schemas.TenantRead,
    responses=problems(401, 403, 404, 409),
)
async def update_tenant(
    tenant_id: uuid.UUID,
    body: schemas.TenantUpdate,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> schemas.TenantRead:
    tenant = await TenantService(session, settings).update(principal, tenant_id, body)
    return schemas.TenantRead.model_validate(tenant)


@router.post(
    "/users",
    response_model=schemas.UserCreated,
    status_code=status.HTTP_201_CREATED,
    responses=problems(401, 403, 409),
)
async def create_user(
    body: schemas.UserCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    realm_admin: RealmAdminDep,
) -> schemas.UserCreated:
    """Tenant admins add users; omit `password` to get a generated one back once. In
    keycloak mode the user is created in the tenant's realm."""
    return await UserService(session, realm_admin).create(principal, body)


@router.post(
    "/users/{user_id}/reset-password",
    response_model=schemas.PasswordReset,
    responses=problems(401, 403, 404, 409),
)
async def reset_password(
    user_id: uuid.UUID,
    principal: CurrentPrincipal,
    session: SessionDep,
    realm_admin: RealmAdminDep,
) -> schemas.PasswordReset:
    """Tenant admins set a new one-time password (in the realm, in keycloak mode)."""
    password = await UserService(session, realm_admin).reset_password(principal, user_id)
    return schemas.PasswordReset(one_time_password=password)


@router.get("/users", response_model=Page[schemas.UserRead], responses=problems(401, 403))
async def list_users(
    principal: CurrentPrincipal,
    session: SessionDep,
    user_status: Annotated[UserStatus | None, Query(alias="status")] = None,
    page: PageNo = 1,
    limit: Limit = 50,
    sort: Literal["username", "created_at", "last_login_at"] = "username",
    order: Order = "asc",
) -> Page[schemas.UserRead]:
    return await UserService(session).list(
        principal, page, limit, user_status, sort, order == "desc"
    )


@router.get("/users/{user_id}", response_model=schemas.UserRead, responses=problems(401, 404))
async def get_user(
    user_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> schemas.UserRead:
    return schemas.UserRead.model_validate(await UserService(session).get(principal, user_id))


@router.patch(
    "/users/{user_id}", response_model=schemas.UserRead, responses=problems(401, 403, 404, 409)
)
async def update_user(
    user_id: uuid.UUID, body: schemas.UserUpdate, principal: CurrentPrincipal, session: SessionDep
) -> schemas.UserRead:
    """Users edit their own profile; admins also change `is_tenant_admin` and `status`."""
    return schemas.UserRead.model_validate(
        await UserService(session).update(principal, user_id, body)
    )
