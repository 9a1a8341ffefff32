"""Async SQLModel over asyncpg: the engine, sessions, and the base every table uses.

Services never commit. `session_scope` (used by the API request dependency and by
worker activities) is the one place that commits or rolls back.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from sqlalchemy import DateTime, MetaData, func
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.config import DatabaseSettings

# Set before the first table is declared so every constraint gets a predictable name
# that migrations can refer to.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION
metadata: MetaData = SQLModel.metadata


def utcnow() -> datetime:
    return datetime.now(UTC)


class TableBase(SQLModel):
    """Columns every table has: UUID key and timezone-aware creation/update times."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    created_at: datetime = Field(
        default_factory=utcnow,
        sa_type=DateTime(timezone=True),
        sa_column_kwargs={"server_default": func.now(), "nullable": False},
    )
    updated_at: datetime = Field(
        default_factory=utcnow,
        sa_type=DateTime(timezone=True),
        sa_column_kwargs={"server_default": func.now(), "onupdate": utcnow, "nullable": False},
    )


def create_engine(settings: DatabaseSettings, *, url: str | None = None) -> AsyncEngine:
    return create_async_engine(
        url or settings.url.get_secret_value(),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        # A restarted PostgreSQL must not leave dead connections in the pool.
        pool_pre_ping=True,
        echo=settings.echo,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


AfterCommit = Callable[[AsyncSession], Awaitable[None]]
_AFTER_COMMIT = "cp_after_commit"


def after_commit(session: AsyncSession, hook: AfterCommit) -> None:
    """Run `hook` once this unit of work has committed (e.g. start a workflow whose
    activities must see the new rows). Hooks run in the same session; what they write
    is committed even when they raise, so a hook can record its own failure before the
    error propagates."""
    session.info.setdefault(_AFTER_COMMIT, []).append(hook)


@asynccontextmanager
async def session_scope(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any error; then after-commit
    hooks."""
    async with sessions() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
        while hooks := session.info.pop(_AFTER_COMMIT, None):
            for hook in hooks:
                try:
                    await hook(session)
                finally:
                    await session.commit()
