"""The API app factory (`uvicorn --factory api.app:create_app`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator

from api.errors import PROBLEM_MEDIA_TYPE, Problem, install_error_handlers
from api.middleware import RequestLogMiddleware
from api.routes import (
    audit,
    auth,
    clusters,
    credentials,
    endpoints,
    health,
    models,
    projects,
    routers,
    system,
    temporal_codec,
    tenants,
    usage,
    workflows,
)
from api.routes.temporal_codec import TemporalCodecCORS
from api.state import AppState
from control_plane.core import temporal
from control_plane.core.codec import payload_codec
from control_plane.core.config import Settings, get_settings
from control_plane.core.db import create_engine, create_sessionmaker
from control_plane.core.logging import configure_logging, get_logger
from control_plane.core.redis import create_redis
from control_plane.core.security import with_dev_signing_key
from control_plane.core.storage import create_object_store
from control_plane.credentials.crypto import load_vault
from control_plane.identity.authn import Authenticator, flush_last_used
from control_plane.identity.keycloak import RealmAdmin, external_identity_provider

log = get_logger(__name__)


def _lifespan(settings: Settings) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # First: a production API without a credential master key must not start.
        vault = load_vault(settings)
        engine = create_engine(settings.database)
        redis = create_redis(settings.redis)
        objects = create_object_store(settings)
        # Lazy: the API starts while Temporal is down and says so in /readyz.
        client = await temporal.connect(
            settings.temporal, codec=payload_codec(settings.codec), lazy=True
        )
        identity_provider = external_identity_provider(settings)
        app.state.cp = AppState(
            settings=settings,
            engine=engine,
            sessions=create_sessionmaker(engine),
            redis=redis,
            objects=objects,
            temporal=client,
            auth=Authenticator(settings, redis, identity_provider),
            vault=vault,
            realm_admin=RealmAdmin(settings) if settings.auth.mode == "keycloak" else None,
        )
        try:
            await objects.ensure_ready()
        except Exception as err:
            log.warning("api.object_store.not_ready", error=str(err))
        if settings.temporal.register_search_attributes:
            try:
                await temporal.ensure_search_attributes(client)
            except Exception as err:
                log.warning("api.search_attributes.not_registered", error=str(err))
        flusher = asyncio.create_task(_flush_api_key_usage(app.state.cp))
        log.info("api.started", port=settings.api.port)
        try:
            yield
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await _flush_once(app.state.cp)
            if identity_provider is not None:
                await identity_provider.aclose()
            if app.state.cp.realm_admin is not None:
                await app.state.cp.realm_admin.aclose()
            await redis.aclose()
            await objects.close()
            await engine.dispose()
            log.info("api.stopped")

    return lifespan


LAST_USED_FLUSH_SECONDS = 30


async def _flush_once(state: AppState) -> None:
    try:
        await flush_last_used(state.sessions, state.redis)
    except Exception as err:
        log.warning("api.api_key_usage.flush_failed", error=str(err))


async def _flush_api_key_usage(state: AppState) -> None:
    """API keys record their last use in Redis; this moves it to PostgreSQL in batches."""
    while True:
        await asyncio.sleep(LAST_USED_FLUSH_SECONDS)
        await _flush_once(state)


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """Document error responses as problem+json, the way they are actually sent."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    problem = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for route, path in schema.get("paths", {}).items():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = problem
            if "requestBody" in operation:
                responses.setdefault("400", {"description": "Malformed body", "content": problem})
            responses.setdefault("500", {"description": "Unexpected error", "content": problem})
            if route != "/healthz":
                responses.setdefault(
                    "503", {"description": "A dependency is unavailable", "content": problem}
                )
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = with_dev_signing_key(settings or get_settings())
    configure_logging(level=settings.log_level, json=settings.json_logs)
    app = FastAPI(
        title="control-plane",
        version="0.1.0",
        summary="Serve AI models with durable Temporal workflows.",
        lifespan=_lifespan(settings),
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(tenants.router)
    app.include_router(projects.router)
    app.include_router(workflows.router)
    app.include_router(system.router)
    app.include_router(audit.router)
    app.include_router(credentials.router)
    app.include_router(clusters.router)
    app.include_router(models.router)
    app.include_router(endpoints.router)
    app.include_router(routers.router)
    app.include_router(usage.router)
    app.include_router(temporal_codec.router)
    # Each app gets its own registry so several apps (tests) can live in one process.
    registry = CollectorRegistry()
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["/metrics"],
        registry=registry,
    ).instrument(app).expose(app, include_in_schema=False)
    app.add_middleware(RequestLogMiddleware)
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID")
    app.add_middleware(TemporalCodecCORS, origins=settings.api.temporal_ui_origins)
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.openapi = lambda: _problem_openapi(app)  # type: ignore[method-assign]
    return app
