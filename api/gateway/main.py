"""Builds the gateway of one process from settings: `cpctl gateway` serves `create_gateway`."""

from __future__ import annotations

import asyncio
import contextlib
import gc

from prometheus_client import CollectorRegistry

from api.gateway.app import Gateway
from api.gateway.inflight import SharedInflight
from api.gateway.table import RoutingTable, TableLoader
from control_plane.core import temporal
from control_plane.core.codec import payload_codec
from control_plane.core.config import Settings, get_settings
from control_plane.core.db import create_engine, create_sessionmaker
from control_plane.core.logging import get_logger
from control_plane.core.redis import create_redis
from control_plane.credentials.crypto import load_vault
from control_plane.routing.limiter import Limiter
from control_plane.usage.recorder import UsageRecorder

log = get_logger(__name__)


def create_gateway(settings: Settings | None = None) -> Gateway:
    settings = settings or get_settings()
    engine = create_engine(settings.database)
    redis = create_redis(settings.redis)
    table = RoutingTable()
    sessions = create_sessionmaker(engine)
    loader = TableLoader(sessions, table, vault=load_vault(settings))
    inflight = SharedInflight(redis, table)
    tasks: list[asyncio.Task[None]] = []
    gateway: Gateway

    async def startup() -> None:
        # Lazy: the gateway serves while Temporal is down; only waking an idle endpoint
        # needs it.
        gateway.temporal = await temporal.connect(
            settings.temporal, codec=payload_codec(settings.codec), lazy=True
        )
        await loader.load_all()
        await usage.start()
        tasks.append(asyncio.create_task(loader.follow(redis, settings.gateway.reload_seconds)))
        tasks.append(asyncio.create_task(inflight.run()))
        # Everything alive now (imports, the table) lives as long as the process: keep it
        # out of the collector's scans, or each full collection walks it all and stalls
        # every request in flight (~100 ms here) under load.
        gc.collect()
        gc.freeze()
        log.info(
            "gateway.started",
            port=settings.gateway.port,
            keys=len(table.keys),
            endpoints=len(table.endpoints),
            routers=len(table.routers),
        )

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await usage.stop()
        await redis.aclose()
        await engine.dispose()
        log.info("gateway.stopped")

    # One registry for the gateway's and the limiter's metrics: `/metrics` shows both.
    registry = CollectorRegistry()
    usage = UsageRecorder(sessions, registry=registry)
    limiter = Limiter(
        redis, on_unavailable=settings.gateway.limits_when_redis_down, registry=registry
    )
    gateway = Gateway(
        settings.gateway,
        table,
        limiter,
        registry=registry,
        usage=usage,
        startup=startup,
        shutdown=shutdown,
    )
    return gateway
