"""Errors render as `application/problem+json` with the status mapping of the API
conventions; unexpected errors never leak internals."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from api.errors import install_error_handlers
from control_plane.core.errors import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    Unauthenticated,
)


class _UniqueViolation(Exception):
    sqlstate = "23505"


def make_app(error: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    return TestClient(app, raise_server_exceptions=False)


class TestControlPlaneErrors:
    @pytest.mark.parametrize(
        ("error", "status", "code"),
        [
            (BadRequest("bad"), 400, "bad-request"),
            (Unauthenticated("who?"), 401, "unauthenticated"),
            (Forbidden("no"), 403, "forbidden"),
            (NotFound("missing"), 404, "not-found"),
            (Conflict("taken"), 409, "conflict"),
            (DependencyUnavailable("down", dependency="redis"), 503, "dependency-unavailable"),
        ],
    )
    def test_status_and_stable_type(self, error: ControlPlaneError, status: int, code: str) -> None:
        response = make_app(error).get("/boom")
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"] == f"urn:control-plane:problem:{code}"
        assert body["status"] == status
        assert body["detail"] == error.message
        assert body["instance"] == "/boom"

    def test_extra_fields_are_included(self) -> None:
        body = make_app(DependencyUnavailable("down", dependency="redis")).get("/boom").json()
        assert body["dependency"] == "redis"


class TestOtherErrors:
    def test_request_validation_is_422_with_locations(self) -> None:
        response = make_app(RuntimeError()).get("/items/not-a-number")
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["loc"] == ["path", "item_id"]

    def test_unknown_route_is_404_problem(self) -> None:
        response = make_app(RuntimeError()).get("/nowhere")
        assert response.status_code == 404
        assert response.json()["type"] == "urn:control-plane:problem:not-found"

    def test_unique_violation_is_409(self) -> None:
        error = IntegrityError("INSERT ...", {}, _UniqueViolation())
        response = make_app(error).get("/boom")
        assert response.status_code == 409
        assert response.json()["detail"] == "a resource with these values already exists"

    def test_value_the_database_cannot_hold_is_422(self) -> None:
        error = DataError("SELECT ...", {}, ValueError("invalid byte sequence 0x00"))
        response = make_app(error).get("/boom")
        assert response.status_code == 422
        assert response.json()["type"] == "urn:control-plane:problem:validation"

    def test_lost_database_is_503(self) -> None:
        error = OperationalError("SELECT 1", {}, ConnectionRefusedError())
        response = make_app(error).get("/boom")
        assert response.status_code == 503
        assert response.json()["dependency"] == "postgres"

    def test_unexpected_error_is_500_without_internals(self) -> None:
        response = make_app(RuntimeError("password=hunter2 at line 3")).get("/boom")
        assert response.status_code == 500
        assert "hunter2" not in response.text
        assert response.json()["type"] == "urn:control-plane:problem:internal"
