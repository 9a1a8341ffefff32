"""Sign-in (local mode): OAuth2 password flow, refresh, logout, current user."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.security import OAuth2PasswordRequestForm

from api.deps import CurrentPrincipal, SessionDep, SettingsDep
from api.errors import problems
from control_plane.identity import schemas
from control_plane.identity.service import AuthService

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post("/token", response_model=schemas.TokenPair, responses=problems(400, 401))
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> schemas.TokenPair:
    """OAuth2 password grant (the `/docs` "Authorize" button uses it). The username is
    `tenant/username`, or just `username` in the bootstrap tenant."""
    return await AuthService(session, settings).login(form.username, form.password, None)


@router.post("/refresh", response_model=schemas.TokenPair, responses=problems(400, 401))
async def refresh(
    body: schemas.RefreshRequest, session: SessionDep, settings: SettingsDep
) -> schemas.TokenPair:
    """Exchange a refresh token for a new pair; the old refresh token stops working."""
    return await AuthService(session, settings).refresh(body.refresh_token)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(body: schemas.RefreshRequest, session: SessionDep, settings: SettingsDep) -> None:
    """Revoke a refresh token (idempotent)."""
    await AuthService(session, settings).logout(body.refresh_token)


@router.get("/me", response_model=schemas.MeRead, responses=problems(400, 401))
async def me(
    principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> schemas.MeRead:
    return await AuthService(session, settings).me(principal)


@router.post("/password", status_code=status.HTTP_204_NO_CONTENT, responses=problems(400, 401, 403))
async def change_password(
    body: schemas.PasswordChange,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> None:
    """Change your own password; every refresh token of yours is revoked."""
    await AuthService(session, settings).change_password(principal, body)
