"""All credential queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import ColumnElement, func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.credentials.schemas import CredentialStatus
from control_plane.credentials.tables import Credential

SORTABLE = {"name", "provider", "created_at", "updated_at"}


class CredentialRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, row: Credential) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def get(self, credential_id: uuid.UUID) -> Credential | None:
        return await self.session.get(Credential, credential_id, populate_existing=True)

    async def live(
        self,
        tenant_id: uuid.UUID,
        project_id: uuid.UUID | None,
        credential_id: uuid.UUID,
        *,
        for_update: bool = False,
    ) -> Credential | None:
        """A live credential of exactly this scope (the project, or the tenant-wide set)."""
        query = select(Credential).where(
            Credential.id == credential_id,
            Credential.tenant_id == tenant_id,
            col(Credential.project_id).is_not_distinct_from(project_id),
            Credential.status != CredentialStatus.DELETED.value,
        )
        if for_update:
            # Writers (and the master key rotation) serialise on the row.
            query = query.with_for_update()
        return (await self.session.exec(query.execution_options(populate_existing=True))).first()

    async def first_live(
        self, tenant_id: uuid.UUID, project_id: uuid.UUID | None, provider: str
    ) -> Credential | None:
        """The oldest live credential of `provider` in exactly this scope."""
        query = (
            select(Credential)
            .where(
                Credential.tenant_id == tenant_id,
                col(Credential.project_id).is_not_distinct_from(project_id),
                Credential.provider == provider,
                Credential.status != CredentialStatus.DELETED.value,
            )
            .order_by(col(Credential.created_at), col(Credential.id))
        )
        return (await self.session.exec(query.limit(1))).first()

    async def name_taken(
        self,
        tenant_id: uuid.UUID,
        project_id: uuid.UUID | None,
        name: str,
        *,
        other_than: uuid.UUID | None = None,
    ) -> bool:
        query = select(Credential.id).where(
            Credential.tenant_id == tenant_id,
            col(Credential.project_id).is_not_distinct_from(project_id),
            Credential.name == name,
            Credential.status != CredentialStatus.DELETED.value,
        )
        if other_than is not None:
            query = query.where(Credential.id != other_than)
        return (await self.session.exec(query.limit(1))).first() is not None

    async def list(
        self,
        tenant_id: uuid.UUID,
        project_id: uuid.UUID | None,
        *,
        provider: str | None,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> tuple[list[Credential], int]:
        conditions: list[ColumnElement[bool]] = [
            col(Credential.tenant_id) == tenant_id,
            col(Credential.project_id).is_not_distinct_from(project_id),
            col(Credential.status) != CredentialStatus.DELETED.value,
        ]
        if provider:
            conditions.append(col(Credential.provider) == provider)
        column = getattr(Credential, sort)
        total = (
            await self.session.exec(select(func.count()).select_from(Credential).where(*conditions))
        ).one()
        rows = (
            await self.session.exec(
                select(Credential)
                .where(*conditions)
                .order_by(column.desc() if descending else column.asc(), col(Credential.id))
                .offset((page - 1) * limit)
                .limit(limit)
            )
        ).all()
        return list(rows), int(total)

    async def not_on_key(
        self, active_key: str, *, after: uuid.UUID | None, limit: int
    ) -> Sequence[Credential]:
        """Live credentials whose data key is wrapped by another master key, in id order,
        locked until the transaction ends."""
        query = select(Credential).where(
            Credential.master_key_id != active_key,
            Credential.status != CredentialStatus.DELETED.value,
        )
        if after is not None:
            query = query.where(col(Credential.id) > after)
        return (
            await self.session.exec(
                query.order_by(col(Credential.id))
                .limit(limit)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).all()

    async def count_live(self, *, not_on_key: str | None = None) -> int:
        query = (
            select(func.count())
            .select_from(Credential)
            .where(Credential.status != CredentialStatus.DELETED.value)
        )
        if not_on_key is not None:
            query = query.where(Credential.master_key_id != not_on_key)
        return int((await self.session.exec(query)).one())
