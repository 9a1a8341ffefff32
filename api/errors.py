"""Renders every error as `application/problem+json` (RFC 9457) in one place."""

from __future__ import annotations

import re
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from starlette.exceptions import HTTPException
from temporalio.service import RPCError, RPCStatusCode

from control_plane.core.errors import (
    PROBLEM_TYPE_BASE,
    Conflict,
    ControlPlaneError,
    DependencyUnavailable,
)
from control_plane.core.logging import get_logger

log = get_logger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
UNIQUE_VIOLATION = "23505"
# SQLSTATE class 22: data exceptions (bad encoding, NUL byte, out of range...).
DATA_EXCEPTION_CLASS = "22"


class Problem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


_DESCRIPTIONS = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found (or outside the caller's tenant and projects)",
    409: "Conflict with the resource's current state",
    503: "A dependency is unavailable",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route; the OpenAPI hook documents them as problem+json."""
    return {code: {"description": _DESCRIPTIONS[code]} for code in codes}


def problem_response(
    request: Request,
    *,
    status: int,
    code: str,
    title: str,
    detail: str | None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = Problem(
        type=PROBLEM_TYPE_BASE + code,
        title=title,
        status=status,
        detail=detail,
        instance=request.url.path,
        **extra,
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _from_error(request: Request, err: ControlPlaneError) -> JSONResponse:
    if err.status >= 500:
        log.warning("api.dependency_error", error=err.message, **err.extra)
    return problem_response(
        request,
        status=err.status,
        code=err.code,
        title=err.title,
        detail=err.message,
        **err.extra,
    )


async def _control_plane_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ControlPlaneError)
    return _from_error(request, err)


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in err.errors()
    ]
    return problem_response(
        request,
        status=422,
        code="validation",
        title="Request validation failed",
        detail="; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
        errors=errors,
    )


def _allowed_methods(request: Request) -> str:
    """Every documented method of the path (the router names only one route's methods).
    A literal path (`/clusters/recommendations`) shadows the templates it also matches
    (`/clusters/{cluster_id}`), as it does in the route table."""
    matches: dict[int, set[str]] = {}
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = (
            "^"
            + re.sub(
                r"\{[^}/]+\}", "[^/]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
            )
            + "$"
        )
        if re.match(pattern, request.url.path):
            methods = matches.setdefault(template.count("{"), set())
            methods |= {method.upper() for method in operations}
    return ", ".join(sorted(matches[min(matches)])) if matches else ""


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, HTTPException)
    if err.status_code == 405:
        err.headers = {**(err.headers or {}), "Allow": _allowed_methods(request)}
    code = {404: "not-found", 405: "method-not-allowed", 401: "unauthenticated"}.get(
        err.status_code, "http-error"
    )
    return problem_response(
        request,
        status=err.status_code,
        code=code,
        title=str(err.detail) if err.status_code < 500 else "Error",
        detail=str(err.detail),
        headers=dict(err.headers) if err.headers else None,
    )


async def _database_error(request: Request, err: Exception) -> JSONResponse:
    sqlstate = str(getattr(getattr(err, "orig", None), "sqlstate", "") or "")
    if isinstance(err, DataError) or sqlstate.startswith(DATA_EXCEPTION_CLASS):
        # Input the database cannot hold (a NUL character, a number out of range).
        return problem_response(
            request,
            status=422,
            code="validation",
            title="Request validation failed",
            detail="a value in the request cannot be stored (for example a NUL character)",
        )
    if isinstance(err, IntegrityError):
        message = (
            "a resource with these values already exists"
            if sqlstate == UNIQUE_VIOLATION
            else "the change conflicts with existing data"
        )
        return _from_error(request, Conflict(message))
    assert isinstance(err, DBAPIError)
    if err.connection_invalidated or isinstance(err, OperationalError | InterfaceError):
        log.warning("api.database_error", error=type(err).__name__)
        return _from_error(
            request, DependencyUnavailable("database unavailable", dependency="postgres")
        )
    return await _unexpected_error(request, err)


async def _connection_error(request: Request, err: Exception) -> JSONResponse:
    dependency = "redis" if isinstance(err, redis.exceptions.RedisError) else "postgres"
    return _from_error(
        request, DependencyUnavailable(f"{dependency} unavailable", dependency=dependency)
    )


async def _temporal_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RPCError)
    if err.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
        return _from_error(
            request, DependencyUnavailable("Temporal unavailable", dependency="temporal")
        )
    return await _unexpected_error(request, err)


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("api.unhandled_error", path=request.url.path)
    return problem_response(
        request,
        status=500,
        code="internal",
        title="Internal error",
        detail="an unexpected error occurred; see the server logs",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ControlPlaneError, _control_plane_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _connection_error)
    app.add_exception_handler(redis.exceptions.TimeoutError, _connection_error)
    app.add_exception_handler(ConnectionError, _connection_error)
    app.add_exception_handler(RPCError, _temporal_error)
    app.add_exception_handler(Exception, _unexpected_error)
