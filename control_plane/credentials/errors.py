"""Errors of the credentials domain."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from control_plane.core.errors import ControlPlaneError


class InvalidFields(ControlPlaneError):
    """The fields of an update, merged with the stored ones, are not valid for the
    provider. Rendered like every other request validation failure (422, `errors`)."""

    status = 422
    code = "validation"
    title = "Request validation failed"

    @classmethod
    def from_validation(cls, err: ValidationError) -> InvalidFields:
        # Locations name the request body's `fields`; inputs are left out (they may be
        # secrets).
        errors: list[dict[str, Any]] = [
            {"loc": ["body", "fields", *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in err.errors(include_input=False, include_context=False, include_url=False)
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return cls(detail, errors=errors)
