"""Usage reports: who may read which project's usage, and the report itself.

Usage is part of what a project shows its readers: `projects:read` on the project
(viewers and up; API keys of the project holding that scope). Without a project, a
report covers the projects the caller can see: the tenant for tenant admins, the
caller's projects for other users, its own project for an API key. A project outside
the caller's tenant or projects is a 404 that says nothing more.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.errors import NotFound
from control_plane.identity.permissions import Principal, authorize
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import ProjectStatus
from control_plane.usage.repository import Aggregate, UsageRepository, UsageScope
from control_plane.usage.schemas import (
    UsageGroup,
    UsageQuery,
    UsageReport,
    UsageTotals,
)

SCOPE = "projects:read"


def _totals(aggregate: Aggregate) -> dict[str, Any]:
    return {
        "requests": aggregate.requests,
        "errors": aggregate.errors,
        "prompt_tokens": aggregate.prompt_tokens,
        "completion_tokens": aggregate.completion_tokens,
        "total_tokens": aggregate.prompt_tokens + aggregate.completion_tokens,
        "latency_ms_p50": aggregate.latency_ms_p50,
        "latency_ms_p95": aggregate.latency_ms_p95,
        "ttft_ms_mean": aggregate.ttft_ms_mean,
    }


def _key(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class UsageService:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.repo = UsageRepository(session)

    async def _projects(
        self, principal: Principal, project_id: uuid.UUID | None
    ) -> Collection[uuid.UUID] | None:
        """The projects the report may cover; None: the whole tenant."""
        if project_id is None:
            if principal.api_key_id is not None:
                project_id = principal.key_project_id
                if project_id is None:
                    raise NotFound("project not found")
            else:
                authorize(principal, SCOPE, tenant_id=principal.tenant_id, what="project")
                visible = principal.visible_projects()
                return None if visible is None else sorted(visible)
        project = await IdentityRepository(self.session).project(project_id)
        if (
            project is None
            or project.status == ProjectStatus.DELETED.value
            or project.tenant_id != principal.tenant_id
        ):
            raise NotFound("project not found")
        authorize(
            principal, SCOPE, tenant_id=project.tenant_id, project_id=project.id, what="project"
        )
        return [project.id]

    async def report(self, principal: Principal, query: UsageQuery) -> UsageReport:
        start, end = query.window
        scope = UsageScope(
            tenant_id=principal.tenant_id,
            projects=await self._projects(principal, query.project_id),
            start=start,
            end=end,
            api_key_id=query.api_key_id,
            route=query.route,
        )
        groups = await self.repo.groups(scope, query.group_by, limit=query.limit + 1)
        return UsageReport(
            project_id=query.project_id,
            api_key_id=query.api_key_id,
            route=query.route,
            start=start,
            end=end,
            group_by=query.group_by,
            groups=[
                UsageGroup(key=_key(key), **_totals(aggregate))
                for key, aggregate in groups[: query.limit]
            ],
            truncated=len(groups) > query.limit,
            total=UsageTotals(**_totals(await self.repo.total(scope))),
        )
