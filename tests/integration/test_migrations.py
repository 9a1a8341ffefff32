"""Migrations on a real PostgreSQL: upgrade -> downgrade -> upgrade, and the tables
declared in code match what the migrations build."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.cli import alembic_config
from control_plane.core.db import metadata
from control_plane.migrations import tables  # noqa: F401
from tests.fixtures.infra import Infra


@pytest_asyncio.fixture(loop_scope="session")
async def empty_database(infra: Infra) -> AsyncIterator[str]:
    name = f"m_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(infra.postgres.dsn("postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield infra.postgres.url(name)
    admin = await asyncpg.connect(infra.postgres.dsn("postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def table_names(url: str) -> set[str]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


def migrate(url: str, direction: str, revision: str) -> None:
    getattr(command, direction)(alembic_config(url), revision)


class TestMigrations:
    async def test_upgrade_downgrade_upgrade(self, empty_database: str) -> None:
        await asyncio.to_thread(migrate, empty_database, "upgrade", "head")
        assert {"alembic_version", "workflow_run"} <= await table_names(empty_database)

        await asyncio.to_thread(migrate, empty_database, "downgrade", "base")
        assert await table_names(empty_database) == {"alembic_version"}

        await asyncio.to_thread(migrate, empty_database, "upgrade", "head")
        assert "workflow_run" in await table_names(empty_database)

    async def test_code_and_migrations_agree(self, empty_database: str) -> None:
        await asyncio.to_thread(migrate, empty_database, "upgrade", "head")
        engine = create_async_engine(empty_database)
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync, opts={"compare_type": True, "compare_server_default": True}
                    ),
                    metadata,
                )
            )
        await engine.dispose()
        assert diff == []

    async def test_constraints_follow_the_naming_convention(self, empty_database: str) -> None:
        await asyncio.to_thread(migrate, empty_database, "upgrade", "head")
        conn = await asyncpg.connect(empty_database.replace("postgresql+asyncpg", "postgresql"))
        try:
            names = {
                r["conname"]
                for r in await conn.fetch(
                    "SELECT conname FROM pg_constraint WHERE conrelid = 'workflow_run'::regclass"
                    " AND contype IN ('p', 'u', 'f', 'c')"
                )
            }
        finally:
            await conn.close()
        assert names == {"pk_workflow_run", "uq_workflow_run_workflow_id"}
