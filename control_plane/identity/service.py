"""Identity business rules: sign-in, tenants, users, projects, memberships, API keys.

Every function checks permissions through `authorize` and writes an audit event in the
caller's transaction. Services never commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.audit import service as audit
from control_plane.core.config import Settings
from control_plane.core.db import utcnow
from control_plane.core.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated
from control_plane.core.logging import get_logger
from control_plane.core.pagination import Page, paginate
from control_plane.core.security import (
    LocalTokens,
    hash_password,
    new_secret,
    sha256_hex,
    verify_password,
)
from control_plane.identity import schemas
from control_plane.identity.authn import API_KEY_MARK, API_KEY_PREFIX_CHARS
from control_plane.identity.keycloak import RealmAdmin
from control_plane.identity.permissions import Principal, authorize, role_allows
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import (
    ApiKey,
    Membership,
    Project,
    ProjectRole,
    ProjectStatus,
    RefreshToken,
    Tenant,
    TenantStatus,
    User,
    UserStatus,
)

log = get_logger(__name__)


# --- sign-in ---------------------------------------------------------------------------


class AuthService:
    def __init__(self, session: AsyncSession, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self.repo = IdentityRepository(session)
        self.tokens = LocalTokens(settings.auth)

    def _require_local(self) -> None:
        if self.settings.auth.mode != "local":
            raise BadRequest("sign-in happens at the identity provider in keycloak mode")

    async def login(
        self, username: str, password: str, tenant_slug: str | None
    ) -> schemas.TokenPair:
        """`username` may be `tenant/username`; a bare name uses the bootstrap tenant."""
        self._require_local()
        if tenant_slug is None and "/" in username:
            tenant_slug, username = username.split("/", 1)
        tenant = await self.repo.tenant_by_slug(tenant_slug or self.settings.auth.bootstrap_tenant)
        user = await self.repo.user_by_username(tenant.id, username) if tenant else None
        # Same answer (and similar cost) whether the user exists or not.
        if user is None or user.password_hash is None:
            verify_password(hash_password("timing-equaliser"), password)
            raise Unauthenticated("wrong username or password")
        if not verify_password(user.password_hash, password):
            raise Unauthenticated("wrong username or password")
        if user.status != UserStatus.ACTIVE.value or (
            tenant is not None and tenant.status != TenantStatus.ACTIVE.value
        ):
            raise Unauthenticated("user is disabled")
        user.last_login_at = utcnow()
        self.session.add(user)
        await audit.record(
            self.session,
            actor=Principal(tenant_id=user.tenant_id, user_id=user.id, username=user.username),
            action="auth.login",
            resource_kind="user",
            resource_id=user.id,
        )
        return await self._issue(user)

    async def _issue(self, user: User) -> schemas.TokenPair:
        access, expires = self.tokens.issue(user.id, user.tenant_id)
        refresh = new_secret()
        self.session.add(
            RefreshToken(
                user_id=user.id,
                token_hash=sha256_hex(refresh),
                expires_at=utcnow() + timedelta(days=self.settings.auth.refresh_token_days),
            )
        )
        return schemas.TokenPair(
            access_token=access,
            expires_in=int((expires - utcnow()).total_seconds()),
            refresh_token=refresh,
        )

    async def refresh(self, refresh_token: str) -> schemas.TokenPair:
        """Rotate: the presented token is revoked and a new pair issued."""
        self._require_local()
        stored = await self.repo.refresh_token(sha256_hex(refresh_token))
        if stored is None or stored.revoked_at is not None or stored.expires_at <= utcnow():
            raise Unauthenticated("refresh token is invalid, expired or revoked")
        user = await self.repo.user(stored.user_id)
        tenant = await self.repo.tenant(user.tenant_id) if user else None
        if (
            user is None
            or user.status != UserStatus.ACTIVE.value
            or tenant is None
            or tenant.status != TenantStatus.ACTIVE.value
        ):
            raise Unauthenticated("user is disabled")
        stored.revoked_at = utcnow()
        self.session.add(stored)
        return await self._issue(user)

    async def logout(self, refresh_token: str) -> None:
        stored = await self.repo.refresh_token(sha256_hex(refresh_token))
        if stored is not None and stored.revoked_at is None:
            stored.revoked_at = utcnow()
            self.session.add(stored)

    async def change_password(self, principal: Principal, body: schemas.PasswordChange) -> None:
        self._require_local()
        user = await self.repo.user(principal.user_id) if principal.user_id else None
        if user is None or user.password_hash is None:
            raise BadRequest("this caller has no password")
        if not verify_password(user.password_hash, body.current_password):
            raise Forbidden("current password is wrong")
        user.password_hash = hash_password(body.new_password)
        self.session.add(user)
        # Every session of this user ends with a password change.
        await revoke_refresh_tokens(self.session, user.id)
        await audit.record(
            self.session,
            actor=principal,
            action="user.password_change",
            resource_kind="user",
            resource_id=user.id,
        )

    async def me(self, principal: Principal) -> schemas.MeRead:
        if principal.user_id is None:
            raise BadRequest("an API key is not a user")
        user = await self.repo.user(principal.user_id)
        tenant = await self.repo.tenant(principal.tenant_id)
        if user is None or tenant is None:
            raise Unauthenticated("unknown user")
        return schemas.MeRead(
            **schemas.UserRead.model_validate(user).model_dump(),
            tenant_slug=tenant.slug,
            projects=dict(principal.roles),
        )


async def revoke_refresh_tokens(session: AsyncSession, user_id: uuid.UUID) -> None:
    for token in (
        await session.exec(
            select(RefreshToken).where(
                RefreshToken.user_id == user_id, col(RefreshToken.revoked_at).is_(None)
            )
        )
    ).all():
        token.revoked_at = utcnow()
        session.add(token)


async def bootstrap_admin(session: AsyncSession, settings: Settings) -> tuple[str, str] | None:
    """Create the bootstrap tenant and its admin when no user exists at all.

    Returns (login name, one-time password) when it created them, else None.
    """
    if (await session.exec(select(func.count()).select_from(User))).one() > 0:
        return None
    repo = IdentityRepository(session)
    slug = settings.auth.bootstrap_tenant
    tenant = await repo.tenant_by_slug(slug)
    if tenant is None:
        tenant = Tenant(slug=slug, display_name=slug.title())
        session.add(tenant)
        await session.flush()
    password = new_secret(18)
    user = User(
        tenant_id=tenant.id,
        username=settings.auth.bootstrap_admin,
        password_hash=hash_password(password),
        is_tenant_admin=True,
    )
    session.add(user)
    await session.flush()
    await audit.record(
        session,
        actor=None,
        action="user.bootstrap",
        resource_kind="user",
        resource_id=user.id,
        tenant_id=tenant.id,
    )
    return user.username, password


# --- tenants ---------------------------------------------------------------------------


class TenantService:
    """Tenant admins of the bootstrap tenant operate the installation (create tenants)."""

    def __init__(self, session: AsyncSession, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self.repo = IdentityRepository(session)

    async def _is_platform_admin(self, principal: Principal) -> bool:
        if not principal.is_tenant_admin:
            return False
        tenant = await self.repo.tenant(principal.tenant_id)
        return tenant is not None and tenant.slug == self.settings.auth.bootstrap_tenant

    async def create(
        self, principal: Principal, body: schemas.TenantCreate
    ) -> schemas.TenantCreated:
        if not await self._is_platform_admin(principal):
            raise Forbidden("creating tenants requires an admin of the bootstrap tenant")
        if await self.repo.tenant_by_slug(body.slug):
            raise Conflict(f"tenant {body.slug} already exists")
        tenant = Tenant(slug=body.slug, display_name=body.display_name)
        self.session.add(tenant)
        await self.session.flush()
        password = new_secret(18)
        admin = User(
            tenant_id=tenant.id,
            username=body.admin_username,
            password_hash=hash_password(password),
            is_tenant_admin=True,
        )
        self.session.add(admin)
        await audit.record(
            self.session,
            actor=principal,
            action="tenant.create",
            resource_kind="tenant",
            resource_id=tenant.id,
        )
        return schemas.TenantCreated(
            **schemas.TenantRead.model_validate(tenant).model_dump(),
            admin_username=admin.username,
            admin_password=password,
        )

    async def list(
        self,
        principal: Principal,
        page: int,
        limit: int,
        sort: str = "slug",
        descending: bool = False,
    ) -> Page[schemas.TenantRead]:
        query = select(Tenant)
        if not await self._is_platform_admin(principal):
            query = query.where(Tenant.id == principal.tenant_id)
        return await paginate(
            self.session,
            query,
            Tenant,
            schemas.TenantRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
        )

    async def get(self, principal: Principal, tenant_id: uuid.UUID) -> Tenant:
        tenant = await self.repo.tenant(tenant_id)
        if tenant is None or (
            tenant.id != principal.tenant_id and not await self._is_platform_admin(principal)
        ):
            raise NotFound("tenant not found")
        return tenant

    async def update(
        self, principal: Principal, tenant_id: uuid.UUID, body: schemas.TenantUpdate
    ) -> Tenant:
        tenant = await self.get(principal, tenant_id)
        platform = await self._is_platform_admin(principal)
        if not (platform or (principal.is_tenant_admin and tenant.id == principal.tenant_id)):
            raise Forbidden("changing a tenant requires its admin role")
        changes = body.model_dump(exclude_unset=True)
        if "status" in changes and not platform:
            raise Forbidden("only an admin of the bootstrap tenant can enable or disable tenants")
        if (
            tenant.slug == self.settings.auth.bootstrap_tenant
            and changes.get("status") == TenantStatus.DISABLED
        ):
            raise Conflict("the bootstrap tenant cannot be disabled")
        for key, value in changes.items():
            setattr(tenant, key, value.value if hasattr(value, "value") else value)
        self.session.add(tenant)
        await audit.record(
            self.session,
            actor=principal,
            action="tenant.update",
            resource_kind="tenant",
            resource_id=tenant.id,
            tenant_id=tenant.id,
            details={"fields": sorted(changes)},
        )
        return tenant


# --- users -----------------------------------------------------------------------------


class UserService:
    """In keycloak mode users live in the realm: creating one or resetting a password goes
    through `realm_admin`, and the row here links to it by `external_subject`."""

    def __init__(self, session: AsyncSession, realm_admin: RealmAdmin | None = None) -> None:
        self.session = session
        self.repo = IdentityRepository(session)
        self.realm_admin = realm_admin

    async def _realm(self, tenant_id: uuid.UUID) -> str:
        tenant = await self.repo.tenant(tenant_id)
        if tenant is None:
            raise NotFound("tenant not found")
        return tenant.slug

    async def create(self, principal: Principal, body: schemas.UserCreate) -> schemas.UserCreated:
        if not principal.is_tenant_admin or principal.api_key_id:
            raise Forbidden("creating users requires the tenant admin role")
        if await self.repo.user_by_username(principal.tenant_id, body.username):
            raise Conflict(f"user {body.username} already exists")
        generated = None if body.password else new_secret(18)
        password = body.password or generated or ""
        subject = None
        if self.realm_admin is not None:
            # The realm holds the password (temporary: changed at first sign-in).
            subject = await self.realm_admin.create_user(
                await self._realm(principal.tenant_id), body.username, body.email, password
            )
        user = User(
            tenant_id=principal.tenant_id,
            username=body.username,
            email=body.email,
            display_name=body.display_name,
            password_hash=None if subject else hash_password(password),
            external_subject=subject,
            is_tenant_admin=body.is_tenant_admin,
        )
        self.session.add(user)
        await self.session.flush()
        await audit.record(
            self.session,
            actor=principal,
            action="user.create",
            resource_kind="user",
            resource_id=user.id,
            details={"username": user.username, "admin": user.is_tenant_admin},
        )
        return schemas.UserCreated(
            **schemas.UserRead.model_validate(user).model_dump(), generated_password=generated
        )

    async def list(
        self,
        principal: Principal,
        page: int,
        limit: int,
        status: UserStatus | None,
        sort: str = "username",
        descending: bool = False,
    ) -> Page[schemas.UserRead]:
        if not principal.is_tenant_admin:
            raise Forbidden("listing users requires the tenant admin role")
        query = select(User).where(User.tenant_id == principal.tenant_id)
        if status:
            query = query.where(User.status == status.value)
        return await paginate(
            self.session,
            query,
            User,
            schemas.UserRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
        )

    async def get(self, principal: Principal, user_id: uuid.UUID) -> User:
        user = await self.repo.user(user_id)
        if user is None or user.tenant_id != principal.tenant_id:
            raise NotFound("user not found")
        if not (principal.is_tenant_admin or principal.user_id == user.id):
            raise NotFound("user not found")
        return user

    async def reset_password(self, principal: Principal, user_id: uuid.UUID) -> str:
        """A new one-time password (returned once); the user's sessions end."""
        if not principal.is_tenant_admin or principal.api_key_id:
            raise Forbidden("resetting passwords requires the tenant admin role")
        user = await self.get(principal, user_id)
        password = new_secret(18)
        if self.realm_admin is not None:
            if user.external_subject is None:
                raise Conflict(f"{user.username} has no account in the identity provider")
            await self.realm_admin.reset_password(
                await self._realm(user.tenant_id), user.external_subject, password, temporary=True
            )
        else:
            user.password_hash = hash_password(password)
            self.session.add(user)
            await revoke_refresh_tokens(self.session, user.id)
        await audit.record(
            self.session,
            actor=principal,
            action="user.password_reset",
            resource_kind="user",
            resource_id=user.id,
        )
        return password

    async def update(
        self, principal: Principal, user_id: uuid.UUID, body: schemas.UserUpdate
    ) -> User:
        user = await self.get(principal, user_id)
        changes = body.model_dump(exclude_unset=True)
        admin_only = {"is_tenant_admin", "status"} & set(changes)
        if admin_only and not principal.is_tenant_admin:
            raise Forbidden("changing roles or status requires the tenant admin role")
        if admin_only and user.id == principal.user_id:
            raise Conflict("admins cannot demote or disable themselves")
        for key, value in changes.items():
            setattr(user, key, value.value if hasattr(value, "value") else value)
        self.session.add(user)
        await audit.record(
            self.session,
            actor=principal,
            action="user.update",
            resource_kind="user",
            resource_id=user.id,
            details={"fields": sorted(changes)},
        )
        return user


# --- projects and memberships ----------------------------------------------------------


class ProjectService:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.repo = IdentityRepository(session)

    async def create(self, principal: Principal, body: schemas.ProjectCreate) -> Project:
        authorize(principal, "projects:write", tenant_id=principal.tenant_id, what="project")
        existing = (
            await self.session.exec(
                select(Project).where(
                    Project.tenant_id == principal.tenant_id, Project.name == body.name
                )
            )
        ).first()
        if existing:
            raise Conflict(f"project {body.name} already exists")
        project = Project(
            tenant_id=principal.tenant_id, name=body.name, description=body.description
        )
        self.session.add(project)
        await self.session.flush()
        if principal.user_id:
            self.session.add(
                Membership(
                    project_id=project.id, user_id=principal.user_id, role=ProjectRole.OWNER.value
                )
            )
        await audit.record(
            self.session,
            actor=principal,
            action="project.create",
            resource_kind="project",
            resource_id=project.id,
            project_id=project.id,
        )
        return project

    async def get(
        self, principal: Principal, project_id: uuid.UUID, scope: str = "projects:read"
    ) -> Project:
        project = await self.repo.project(project_id)
        if project is None or project.status == ProjectStatus.DELETED.value:
            raise NotFound("project not found")
        authorize(
            principal, scope, tenant_id=project.tenant_id, project_id=project.id, what="project"
        )
        return project

    async def list(
        self,
        principal: Principal,
        page: int,
        limit: int,
        sort: str = "name",
        descending: bool = False,
    ) -> Page[schemas.ProjectRead]:
        query = select(Project).where(
            Project.tenant_id == principal.tenant_id, Project.status != ProjectStatus.DELETED.value
        )
        visible = principal.visible_projects()
        if visible is not None:
            query = query.where(col(Project.id).in_(visible))
        return await paginate(
            self.session,
            query,
            Project,
            schemas.ProjectRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
        )

    async def update(
        self, principal: Principal, project_id: uuid.UUID, body: schemas.ProjectUpdate
    ) -> Project:
        project = await self.get(principal, project_id, "projects:admin")
        changes = body.model_dump(exclude_unset=True)
        for key, value in changes.items():
            setattr(project, key, value)
        self.session.add(project)
        await audit.record(
            self.session,
            actor=principal,
            action="project.update",
            resource_kind="project",
            resource_id=project.id,
            project_id=project.id,
            details={"fields": sorted(changes)},
        )
        return project

    async def delete(self, principal: Principal, project_id: uuid.UUID) -> Project:
        """A status, not a row deletion; the project's API keys stop working at once."""
        project = await self.get(principal, project_id, "projects:admin")
        project.status = ProjectStatus.DELETED.value
        # Frees the name for a new project.
        project.name = f"{project.name[:20]}-deleted-{project.id.hex[:12]}"
        self.session.add(project)
        await audit.record(
            self.session,
            actor=principal,
            action="project.delete",
            resource_kind="project",
            resource_id=project.id,
            project_id=project.id,
        )
        return project

    # members

    async def members(
        self, principal: Principal, project_id: uuid.UUID
    ) -> Sequence[schemas.MemberRead]:
        await self.get(principal, project_id, "members:read")
        return [
            schemas.MemberRead(
                user_id=u.id, username=u.username, role=ProjectRole(m.role), added_at=m.created_at
            )
            for m, u in await self.repo.memberships(project_id)
        ]

    async def _membership(self, project_id: uuid.UUID, user_id: uuid.UUID) -> Membership | None:
        return (
            await self.session.exec(
                select(Membership).where(
                    Membership.project_id == project_id, Membership.user_id == user_id
                )
            )
        ).first()

    async def add_member(
        self, principal: Principal, project_id: uuid.UUID, body: schemas.MemberAdd
    ) -> schemas.MemberRead:
        project = await self.get(principal, project_id, "members:admin")
        user = await self.repo.user(body.user_id)
        if user is None or user.tenant_id != project.tenant_id:
            raise NotFound("user not found")
        if await self._membership(project_id, user.id):
            raise Conflict(f"{user.username} is already a member")
        membership = Membership(project_id=project_id, user_id=user.id, role=body.role.value)
        self.session.add(membership)
        await self.session.flush()
        await audit.record(
            self.session,
            actor=principal,
            action="member.add",
            resource_kind="membership",
            resource_id=user.id,
            project_id=project_id,
            details={"role": body.role.value},
        )
        return schemas.MemberRead(
            user_id=user.id, username=user.username, role=body.role, added_at=membership.created_at
        )

    async def _owners(self, project_id: uuid.UUID) -> int:
        return (
            await self.session.exec(
                select(func.count())
                .select_from(Membership)
                .where(
                    Membership.project_id == project_id, Membership.role == ProjectRole.OWNER.value
                )
            )
        ).one()

    async def update_member(
        self,
        principal: Principal,
        project_id: uuid.UUID,
        user_id: uuid.UUID,
        body: schemas.MemberUpdate,
    ) -> schemas.MemberRead:
        await self.get(principal, project_id, "members:admin")
        membership = await self._membership(project_id, user_id)
        user = await self.repo.user(user_id)
        if membership is None or user is None:
            raise NotFound("member not found")
        if (
            membership.role == ProjectRole.OWNER.value
            and body.role is not ProjectRole.OWNER
            and await self._owners(project_id) == 1
        ):
            raise Conflict("a project keeps at least one owner")
        membership.role = body.role.value
        self.session.add(membership)
        await audit.record(
            self.session,
            actor=principal,
            action="member.update",
            resource_kind="membership",
            resource_id=user_id,
            project_id=project_id,
            details={"role": body.role.value},
        )
        return schemas.MemberRead(
            user_id=user.id, username=user.username, role=body.role, added_at=membership.created_at
        )

    async def remove_member(
        self, principal: Principal, project_id: uuid.UUID, user_id: uuid.UUID
    ) -> None:
        await self.get(principal, project_id, "members:admin")
        membership = await self._membership(project_id, user_id)
        if membership is None:
            raise NotFound("member not found")
        if membership.role == ProjectRole.OWNER.value and await self._owners(project_id) == 1:
            raise Conflict("a project keeps at least one owner")
        await self.session.delete(membership)
        await audit.record(
            self.session,
            actor=principal,
            action="member.remove",
            resource_kind="membership",
            resource_id=user_id,
            project_id=project_id,
        )


# --- API keys --------------------------------------------------------------------------


class ApiKeyService:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.projects = ProjectService(session)

    async def create(
        self, principal: Principal, project_id: uuid.UUID, body: schemas.ApiKeyCreate
    ) -> schemas.ApiKeyCreated:
        project = await self.projects.get(principal, project_id, "api_keys:write")
        if principal.api_key_id:
            raise Forbidden("API keys cannot create API keys")
        # A key never carries more than its creator's role allows.
        if not principal.is_tenant_admin:
            role = principal.roles[project.id]
            too_strong = [s for s in body.scopes if not role_allows(role, s)]
            if too_strong:
                raise Forbidden(f"the {role.value} role cannot grant {', '.join(too_strong)}")
        if body.expires_at is not None and body.expires_at <= utcnow():
            raise BadRequest("expires_at must be in the future")
        public = new_secret(16).replace("-", "").replace("_", "")[:API_KEY_PREFIX_CHARS]
        secret = new_secret(32)
        key = ApiKey(
            tenant_id=project.tenant_id,
            project_id=project.id,
            name=body.name,
            prefix=API_KEY_MARK + public,
            secret_hash=sha256_hex(secret),
            scopes=body.scopes,
            allowed_models=body.allowed_models,
            rpm_limit=body.rpm_limit,
            tpm_limit=body.tpm_limit,
            expires_at=body.expires_at,
            created_by=principal.user_id,
        )
        self.session.add(key)
        await self.session.flush()
        await audit.record(
            self.session,
            actor=principal,
            action="api_key.create",
            resource_kind="api_key",
            resource_id=key.id,
            project_id=project.id,
            details={"prefix": key.prefix, "scopes": key.scopes},
        )
        return schemas.ApiKeyCreated(
            **schemas.ApiKeyRead.model_validate(key).model_dump(), key=f"{key.prefix}_{secret}"
        )

    async def list(
        self,
        principal: Principal,
        project_id: uuid.UUID,
        page: int,
        limit: int,
        sort: str = "created_at",
        descending: bool = True,
    ) -> Page[schemas.ApiKeyRead]:
        await self.projects.get(principal, project_id, "api_keys:read")
        query = select(ApiKey).where(ApiKey.project_id == project_id)
        return await paginate(
            self.session,
            query,
            ApiKey,
            schemas.ApiKeyRead,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
        )

    async def get(
        self,
        principal: Principal,
        project_id: uuid.UUID,
        key_id: uuid.UUID,
        scope: str = "api_keys:read",
    ) -> ApiKey:
        await self.projects.get(principal, project_id, scope)
        key = await self.session.get(ApiKey, key_id)
        if key is None or key.project_id != project_id:
            raise NotFound("API key not found")
        return key

    async def revoke(
        self, principal: Principal, project_id: uuid.UUID, key_id: uuid.UUID
    ) -> ApiKey:
        key = await self.get(principal, project_id, key_id, "api_keys:write")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            self.session.add(key)
            await audit.record(
                self.session,
                actor=principal,
                action="api_key.revoke",
                resource_kind="api_key",
                resource_id=key.id,
                project_id=project_id,
            )
        return key
