"""`Annotated` dependency aliases so routes read like signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from api.state import AppState
from control_plane.core.config import Settings
from control_plane.core.db import session_scope


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


SessionDep = Annotated[AsyncSession, Depends(get_session)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
