"""Who may do what: principals, `<resource>:<action>` scopes, and the one check every
service calls.

Resources outside the caller's tenant or projects are reported as missing (404), so a
caller cannot learn that they exist; a member whose role is too weak gets 403.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from control_plane.core.errors import Forbidden, NotFound
from control_plane.identity.tables import ProjectRole

RESOURCES = frozenset(
    {
        "projects",
        "members",
        "api_keys",
        "credentials",
        "workflows",
        "audit",
        "clusters",
        "models",
        "endpoints",
        "routers",
        "benchmarks",
        "datasets",
        "playground",
        "gateway",
    }
)


class Action(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


# Each action includes the weaker ones.
_RANK = {Action.READ: 0, Action.WRITE: 1, Action.ADMIN: 2}
ROLE_ACTION = {
    ProjectRole.VIEWER: Action.READ,
    ProjectRole.MEMBER: Action.WRITE,
    ProjectRole.OWNER: Action.ADMIN,
}


def parse_scope(scope: str) -> tuple[str, Action]:
    resource, _, action = scope.partition(":")
    if resource not in RESOURCES and resource != "*":
        raise ValueError(f"unknown resource {resource!r} in scope {scope!r}")
    try:
        return resource, Action(action)
    except ValueError:
        raise ValueError(f"scope {scope!r} must end in :read, :write or :admin") from None


def scope_grants(granted: str, wanted: str) -> bool:
    g_resource, g_action = parse_scope(granted)
    w_resource, w_action = parse_scope(wanted)
    return g_resource in ("*", w_resource) and _RANK[g_action] >= _RANK[w_action]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    is_tenant_admin: bool = False
    # Users: role per project. API keys: their one project, with the key's scopes.
    roles: Mapping[uuid.UUID, ProjectRole] = field(default_factory=dict)
    key_project_id: uuid.UUID | None = None
    key_scopes: frozenset[str] = frozenset()
    username: str | None = None

    @property
    def kind(self) -> str:
        return "api_key" if self.api_key_id else "user"

    @property
    def actor_id(self) -> str:
        return str(self.api_key_id or self.user_id)

    def visible_projects(self) -> set[uuid.UUID] | None:
        """Projects this caller may see; None means every project of the tenant."""
        if self.api_key_id:
            return {self.key_project_id} if self.key_project_id else set()
        if self.is_tenant_admin:
            return None
        return set(self.roles)


def authorize(
    principal: Principal,
    scope: str,
    *,
    tenant_id: uuid.UUID,
    project_id: uuid.UUID | None = None,
    what: str = "resource",
) -> None:
    """Raise unless `principal` holds `scope` on the tenant (or on `project_id`).

    Outside the caller's tenant or projects: NotFound. Visible but not allowed: Forbidden.
    """
    resource, action = parse_scope(scope)
    if tenant_id != principal.tenant_id:
        raise NotFound(f"{what} not found")
    if principal.api_key_id:
        if project_id is None or project_id != principal.key_project_id:
            raise NotFound(f"{what} not found")
        if not any(scope_grants(granted, scope) for granted in principal.key_scopes):
            raise Forbidden(f"this API key lacks the {scope} scope")
        return
    if principal.is_tenant_admin:
        return
    if project_id is None:
        # Tenant-wide reads are allowed (lists are filtered to the caller's projects).
        if action is Action.READ:
            return
        raise Forbidden(f"{scope} on the tenant requires the tenant admin role")
    role = principal.roles.get(project_id)
    if role is None:
        raise NotFound(f"{what} not found")
    if _RANK[ROLE_ACTION[role]] < _RANK[action]:
        raise Forbidden(f"the {role.value} role cannot {action.value} {resource}")


def role_allows(role: ProjectRole, scope: str) -> bool:
    _, action = parse_scope(scope)
    return _RANK[ROLE_ACTION[role]] >= _RANK[action]
