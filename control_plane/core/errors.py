"""Error classes that carry their HTTP status; one handler renders them as problem+json.

Services raise these; routes never build error responses by hand.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_TYPE_BASE = "urn:control-plane:problem:"


class ControlPlaneError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_BASE + self.code


class BadRequest(ControlPlaneError):
    status = 400
    code = "bad-request"
    title = "Bad request"


class Unauthenticated(ControlPlaneError):
    status = 401
    code = "unauthenticated"
    title = "Authentication required"


class Forbidden(ControlPlaneError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(ControlPlaneError):
    status = 404
    code = "not-found"
    title = "Not found"


class Conflict(ControlPlaneError):
    status = 409
    code = "conflict"
    title = "Conflict"


class DependencyUnavailable(ControlPlaneError):
    status = 503
    code = "dependency-unavailable"
    title = "Dependency unavailable"

    def __init__(self, message: str, *, dependency: str, **extra: Any) -> None:
        super().__init__(message, dependency=dependency, **extra)
        self.dependency = dependency
