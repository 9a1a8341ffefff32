"""What the built-in OpenAI-compatible servers (`simulator`, `embeddings_server`,
`transformers_server`) share: errors in OpenAI's shape, compact JSON, SSE framing, and
running an app whose model loads in the background until it has loaded or failed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.responses import Response

JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An OpenAI-style error: raised while handling a request, rendered by
    `error_response`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(error: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(error_body(error)), error.status, {**JSON_HEADERS, **(headers or {})})


def serve_loading_app(
    build: Callable[[Callable[[], None]], Starlette], host: str, port: int
) -> Starlette:
    """Serve the app `build(stop)` makes until stopped; `stop` (callable from any thread,
    e.g. the one loading the model when loading fails) ends serving. Returns the app so
    the caller can read why it stopped."""
    import uvicorn

    server: uvicorn.Server | None = None

    def stop() -> None:
        # uvicorn polls the flag and shuts down.
        if server is not None:
            server.should_exit = True

    app = build(stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            loop="auto",
            http="auto",
            lifespan="on",
            server_header=False,
            date_header=False,
        )
    )
    server.run()
    return app
