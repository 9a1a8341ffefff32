"""Binds the request's correlation id into structlog context and logs each request."""

from __future__ import annotations

import time

import structlog
from asgi_correlation_id import correlation_id
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.core.logging import get_logger

log = get_logger("api.access")


class RequestLogMiddleware:
    """Pure ASGI (no response buffering, so SSE streams pass straight through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with structlog.contextvars.bound_contextvars(correlation_id=correlation_id.get()):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                path = scope.get("path", "")
                if path not in ("/healthz", "/metrics"):
                    log.info(
                        "api.request",
                        method=scope.get("method"),
                        path=path,
                        status=status,
                        duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    )
