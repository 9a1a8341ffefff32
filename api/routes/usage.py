"""Usage of the gateway: requests, errors, tokens and latency per model, API key,
target, day or hour, from the per-request records the gateways write in batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, SessionDep
from api.errors import problems
from control_plane.usage.schemas import UsageQuery, UsageReport
from control_plane.usage.service import UsageService

router = APIRouter(prefix="/api/v1/usage", tags=["usage"])


@router.get("", response_model=UsageReport, responses=problems(401, 403, 404))
async def get_usage(
    query: Annotated[UsageQuery, Query()], principal: CurrentPrincipal, session: SessionDep
) -> UsageReport:
    """Totals of the gateway requests that finished in `[start, end)` (by default the
    last 24 hours), per group and overall: requests, errors (status 400 and up), prompt,
    completion and total tokens, median and 95th percentile latency, mean time to first
    token of streams. Readers of a project (`projects:read`) see its usage; without
    `project_id`, the report covers every project the caller can see. Records reach the
    database within about a second of each request."""
    return await UsageService(session).report(principal, query)
