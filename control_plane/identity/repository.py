"""All identity queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.identity.tables import (
    ApiKey,
    Membership,
    Project,
    ProjectRole,
    ProjectStatus,
    RefreshToken,
    Tenant,
    User,
)


class IdentityRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def tenant_by_slug(self, slug: str) -> Tenant | None:
        return (await self.session.exec(select(Tenant).where(Tenant.slug == slug))).first()

    async def tenant(self, tenant_id: uuid.UUID) -> Tenant | None:
        return await self.session.get(Tenant, tenant_id)

    async def user(self, user_id: uuid.UUID) -> User | None:
        return await self.session.get(User, user_id)

    async def user_by_username(self, tenant_id: uuid.UUID, username: str) -> User | None:
        return (
            await self.session.exec(
                select(User).where(User.tenant_id == tenant_id, User.username == username)
            )
        ).first()

    async def user_by_subject(self, tenant_id: uuid.UUID, subject: str) -> User | None:
        return (
            await self.session.exec(
                select(User).where(User.tenant_id == tenant_id, User.external_subject == subject)
            )
        ).first()

    async def roles_of(self, user_id: uuid.UUID) -> dict[uuid.UUID, ProjectRole]:
        rows = (
            await self.session.exec(
                select(Membership.project_id, Membership.role)
                .join(Project, col(Project.id) == col(Membership.project_id))
                .where(Membership.user_id == user_id, Project.status == ProjectStatus.ACTIVE.value)
            )
        ).all()
        return {project_id: ProjectRole(role) for project_id, role in rows}

    async def project(self, project_id: uuid.UUID) -> Project | None:
        return await self.session.get(Project, project_id)

    async def refresh_token(self, token_hash: str) -> RefreshToken | None:
        return (
            await self.session.exec(
                select(RefreshToken).where(RefreshToken.token_hash == token_hash)
            )
        ).first()

    async def api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        return (await self.session.exec(select(ApiKey).where(ApiKey.prefix == prefix))).first()

    async def memberships(self, project_id: uuid.UUID) -> Sequence[tuple[Membership, User]]:
        return (
            await self.session.exec(
                select(Membership, User)
                .join(User, col(User.id) == col(Membership.user_id))
                .where(Membership.project_id == project_id)
                .order_by(col(User.username))
            )
        ).all()
