"""`Annotated` dependency aliases so routes read like signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import Depends, Query, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from api.state import AppState
from control_plane.core.config import Settings
from control_plane.core.db import session_scope
from control_plane.core.errors import Forbidden, Unauthenticated
from control_plane.identity.keycloak import RealmAdmin
from control_plane.identity.permissions import Principal


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.cp
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """The request's unit of work: committed when the route returns, rolled back on error."""
    async with session_scope(state.sessions) as session:
        yield session


def get_temporal(state: StateDep) -> Client:
    return state.temporal


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


# scope="function": commit before the response is sent, so a client that got a 2xx
# always sees its change, and a failed commit is an error response, not a lost write.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
TemporalDep = Annotated[Client, Depends(get_temporal)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


bearer = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


async def get_principal(
    state: StateDep, session: SessionDep, token: Annotated[str | None, Depends(bearer)]
) -> Principal:
    """The caller: a user (our JWT or Keycloak's) or an API key (`cpk_...`)."""
    if not token:
        raise Unauthenticated("a bearer token or API key is required")
    return await state.auth.authenticate(session, token)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_tenant_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_tenant_admin:
        raise Forbidden("this operation requires the tenant admin role")
    return principal


TenantAdmin = Annotated[Principal, Depends(require_tenant_admin)]


def get_realm_admin(state: StateDep) -> RealmAdmin | None:
    return state.realm_admin


RealmAdminDep = Annotated[RealmAdmin | None, Depends(get_realm_admin)]


# List parameters shared by every collection route.
PageNo = Annotated[int, Query(ge=1, le=100_000)]
Limit = Annotated[int, Query(ge=1, le=200)]
Order = Literal["asc", "desc"]
