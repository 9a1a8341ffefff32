"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from api.deps import StateDep
from api.errors import problem_response
from api.state import AppState
from control_plane.core.logging import get_logger

router = APIRouter(tags=["health"])
log = get_logger(__name__)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (no dependency is checked)."""
    return Health(status="ok")


async def _postgres(state: AppState) -> None:
    async with state.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _redis(state: AppState) -> None:
    await state.redis.ping()


async def _temporal(state: AppState) -> None:
    if not await state.temporal.service_client.check_health():
        raise RuntimeError("Temporal reports unhealthy")


async def _object_store(state: AppState) -> None:
    await state.objects.check()


CHECKS: dict[str, Callable[[AppState], Awaitable[None]]] = {
    "postgres": _postgres,
    "redis": _redis,
    "temporal": _temporal,
    "object_store": _object_store,
}


async def _run(name: str, state: AppState) -> str:
    try:
        await asyncio.wait_for(CHECKS[name](state), state.settings.api.readiness_timeout_seconds)
    except Exception as err:
        log.warning("api.readiness.failed", dependency=name, error=str(err) or type(err).__name__)
        return f"unavailable: {str(err)[:200] or type(err).__name__}"
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"description": "A dependency is unreachable"}},
)
async def readyz(request: Request, state: StateDep) -> Readiness | JSONResponse:
    """PostgreSQL, Redis, Temporal and the object store are reachable."""
    names = list(CHECKS)
    results = dict(zip(names, await asyncio.gather(*(_run(n, state) for n in names)), strict=True))
    failing = [name for name, result in results.items() if result != "ok"]
    if failing:
        return problem_response(
            request,
            status=503,
            code="dependency-unavailable",
            title="Dependency unavailable",
            detail="unreachable: " + ", ".join(failing),
            failing=failing,
            checks=results,
        )
    return Readiness(status="ready", checks=results)
