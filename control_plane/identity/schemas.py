"""Request and response bodies of identity routes (never table rows)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
)

from control_plane.identity.permissions import RESOURCES, parse_scope
from control_plane.identity.tables import ProjectRole, ProjectStatus, TenantStatus, UserStatus

SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
SCOPE_PATTERN = r"^(\*|" + "|".join(sorted(RESOURCES)) + r"):(read|write|admin)$"


def _scopes(values: list[str]) -> list[str]:
    for scope in values:
        parse_scope(scope)
    return sorted(set(values))


# 1-63 lowercase letters, digits and dashes, not at either end.
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN)]
Scope = Annotated[str, StringConstraints(pattern=SCOPE_PATTERN)]
Username = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._@+-]+$")
]
Password = Annotated[str, StringConstraints(min_length=12, max_length=256)]
# Free text PostgreSQL can store: anything but NUL (a 422 from the schema, not the DB).
NO_NUL_PATTERN = r"^[^\x00]*$"
Scopes = Annotated[list[Scope], AfterValidator(_scopes), Field(min_length=1, max_length=64)]


class TokenPair(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    refresh_token: str


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=512)


class PasswordChange(BaseModel):
    current_password: str = Field(min_length=1, max_length=256)
    new_password: Password


class TenantCreate(BaseModel):
    slug: Slug
    display_name: str = Field(min_length=1, max_length=255, pattern=NO_NUL_PATTERN)
    admin_username: Username = "admin"


class TenantUpdate(BaseModel):
    display_name: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=NO_NUL_PATTERN
    )
    status: TenantStatus | None = None


class TenantRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    slug: str
    display_name: str
    status: TenantStatus
    created_at: datetime


class TenantCreated(TenantRead):
    admin_username: str
    # Shown once.
    admin_password: str


class UserCreate(BaseModel):
    username: Username
    email: str | None = Field(default=None, max_length=320)
    display_name: str | None = Field(default=None, max_length=255, pattern=NO_NUL_PATTERN)
    # Omit to get a generated one-time password back.
    password: Password | None = None
    is_tenant_admin: StrictBool = False


class UserUpdate(BaseModel):
    email: str | None = Field(default=None, max_length=320)
    display_name: str | None = Field(default=None, max_length=255, pattern=NO_NUL_PATTERN)
    is_tenant_admin: StrictBool | None = None
    status: UserStatus | None = None


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID
    username: str
    email: str | None
    display_name: str | None
    is_tenant_admin: bool
    status: UserStatus
    last_login_at: datetime | None
    created_at: datetime


class UserCreated(UserRead):
    # Present only when the server generated it; shown once.
    generated_password: str | None = None


class PasswordReset(BaseModel):
    # Shown once; the user must change it at the next sign-in in keycloak mode.
    one_time_password: str


class MeRead(UserRead):
    tenant_slug: str
    projects: dict[uuid.UUID, ProjectRole]


class ProjectCreate(BaseModel):
    name: Slug
    description: str | None = Field(default=None, max_length=2000, pattern=NO_NUL_PATTERN)


class ProjectUpdate(BaseModel):
    description: str | None = Field(default=None, max_length=2000, pattern=NO_NUL_PATTERN)


class ProjectRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    description: str | None
    status: ProjectStatus
    created_at: datetime


class MemberAdd(BaseModel):
    user_id: uuid.UUID
    role: ProjectRole


class MemberUpdate(BaseModel):
    role: ProjectRole


class MemberRead(BaseModel):
    user_id: uuid.UUID
    username: str
    role: ProjectRole
    added_at: datetime


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255, pattern=NO_NUL_PATTERN)
    scopes: Scopes = ["gateway:write"]
    expires_at: datetime | None = None
    rpm_limit: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm_limit: int | None = Field(default=None, ge=1, le=10_000_000_000)
    allowed_models: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] | None = (
        Field(default=None, max_length=500)
    )


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    allowed_models: list[str] | None
    rpm_limit: int | None
    tpm_limit: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_by: uuid.UUID | None
    created_at: datetime


class ApiKeyCreated(ApiKeyRead):
    # The whole key; shown once, never stored.
    key: str
