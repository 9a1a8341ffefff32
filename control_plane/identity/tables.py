"""Tenants, users, projects, memberships, refresh tokens and API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import DateTime, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class TenantStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class UserStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class ProjectStatus(StrEnum):
    ACTIVE = "active"
    DELETING = "deleting"
    DELETED = "deleted"


class ProjectRole(StrEnum):
    OWNER = "owner"
    MEMBER = "member"
    VIEWER = "viewer"


class Tenant(TableBase, table=True):
    """A Keycloak realm in keycloak mode; a local tenant otherwise."""

    __tablename__ = "tenant"

    slug: str = Field(max_length=63, unique=True)
    display_name: str = Field(max_length=255)
    status: str = Field(default=TenantStatus.ACTIVE.value, max_length=16)


class User(TableBase, table=True):
    __tablename__ = "user_account"
    __table_args__ = (
        UniqueConstraint("tenant_id", "username"),
        UniqueConstraint("tenant_id", "external_subject"),
    )

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    username: str = Field(max_length=255)
    email: str | None = Field(default=None, max_length=320)
    display_name: str | None = Field(default=None, max_length=255)
    # None for users who sign in through Keycloak.
    password_hash: str | None = Field(default=None, max_length=255)
    # `sub` of the identity provider's token (keycloak mode).
    external_subject: str | None = Field(default=None, max_length=255)
    is_tenant_admin: bool = False
    status: str = Field(default=UserStatus.ACTIVE.value, max_length=16)
    last_login_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class Project(TableBase, table=True):
    __tablename__ = "project"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    name: str = Field(max_length=63)
    description: str | None = Field(default=None, max_length=2000)
    status: str = Field(default=ProjectStatus.ACTIVE.value, max_length=16)


class Membership(TableBase, table=True):
    __tablename__ = "membership"
    __table_args__ = (UniqueConstraint("project_id", "user_id"),)

    project_id: uuid.UUID = Field(foreign_key="project.id", index=True)
    user_id: uuid.UUID = Field(foreign_key="user_account.id", index=True)
    role: str = Field(max_length=16)


class RefreshToken(TableBase, table=True):
    """Opaque refresh tokens, stored as SHA-256; rotated on every use."""

    __tablename__ = "refresh_token"

    user_id: uuid.UUID = Field(foreign_key="user_account.id", index=True)
    token_hash: str = Field(max_length=64, unique=True)
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ApiKey(TableBase, table=True):
    __tablename__ = "api_key"

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    project_id: uuid.UUID = Field(foreign_key="project.id", index=True)
    name: str = Field(max_length=255)
    # Public, identifiable part (`cpk_<12 chars>`); the secret part is stored hashed.
    prefix: str = Field(max_length=32, unique=True)
    secret_hash: str = Field(max_length=64)
    scopes: list[str] = Field(default_factory=list, sa_type=JSONB)
    allowed_models: list[str] | None = Field(default=None, sa_type=JSONB)
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_used_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    created_by: uuid.UUID | None = Field(default=None, foreign_key="user_account.id")
