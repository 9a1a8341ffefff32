"""Worker entry point: one Temporal worker per requested pool, in one process."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from control_plane.core import temporal
from control_plane.core.codec import payload_codec
from control_plane.core.config import Settings, WorkerSettings
from control_plane.core.db import create_engine, create_sessionmaker
from control_plane.core.logging import get_logger
from control_plane.core.redis import create_redis
from control_plane.core.storage import create_object_store
from control_plane.credentials.crypto import load_vault
from control_plane.models.schedules import ensure_model_schedules
from workers.registry import POOLS, WorkerResources
from workflows.queues import Queue, task_queue

log = get_logger(__name__)

HEARTBEAT_THROTTLE_SECONDS = 2


class _LogContextInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        with structlog.contextvars.bound_contextvars(
            correlation_id=info.workflow_id,
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
            activity=info.activity_type,
            attempt=info.attempt,
        ):
            return await self.next.execute_activity(input)


class LogContextInterceptor(Interceptor):
    """Binds workflow and run ids to every log line an activity writes."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _LogContextInbound(next)


def _workflow_runner() -> SandboxedWorkflowRunner:
    # Payload models are pydantic; re-importing pydantic per workflow run is slow and
    # memory-hungry, and it is deterministic, so it passes through the sandbox.
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            "pydantic", "pydantic_core", "annotated_types"
        )
    )


def build_workers(
    client: Client,
    resources: WorkerResources,
    queues: Sequence[Queue],
    *,
    prefix: str = "",
    settings: WorkerSettings | None = None,
) -> list[Worker]:
    settings = settings or WorkerSettings()
    workers = []
    for queue in queues:
        pool = POOLS[queue]
        workers.append(
            Worker(
                client,
                task_queue=task_queue(queue, prefix),
                workflows=list(pool.workflows),
                activities=pool.activities(resources),
                interceptors=[LogContextInterceptor()],
                workflow_runner=_workflow_runner(),
                max_concurrent_activities=(
                    pool.max_concurrent_activities or settings.max_concurrent_activities
                ),
                graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown_seconds),
                # The SDK otherwise forwards heartbeats only every 0.8 x the heartbeat
                # timeout; resumable downloads need their offsets to land promptly.
                max_heartbeat_throttle_interval=timedelta(seconds=HEARTBEAT_THROTTLE_SECONDS),
                default_heartbeat_throttle_interval=timedelta(seconds=HEARTBEAT_THROTTLE_SECONDS),
            )
        )
    return workers


async def run_workers(settings: Settings, queues: Sequence[Queue]) -> None:
    """Run until SIGINT/SIGTERM, then let running activities finish or heartbeat out."""
    client = await temporal.connect(settings.temporal, codec=payload_codec(settings.codec))
    if settings.temporal.register_search_attributes:
        await temporal.ensure_search_attributes(client)
    engine = create_engine(settings.database)
    objects = create_object_store(settings)
    await objects.ensure_ready()
    resources = WorkerResources(
        sessions=create_sessionmaker(engine),
        vault=load_vault(settings),
        data_dir=settings.data_dir,
        objects=objects,
        models=settings.models,
        redis=create_redis(settings.redis),
    )
    if Queue.ORCHESTRATION in queues:
        await ensure_model_schedules(
            client,
            settings.temporal.task_queue_prefix,
            sync_every=timedelta(hours=settings.models.catalog_sync_hours),
            rescan_every=timedelta(hours=settings.models.rescan_hours),
        )
    workers = build_workers(
        client,
        resources,
        queues,
        prefix=settings.temporal.task_queue_prefix,
        settings=settings.worker,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = [task_queue(q, settings.temporal.task_queue_prefix) for q in queues]
    log.info("workers.started", queues=names)
    runs = [asyncio.create_task(w.run()) for w in workers]
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
    log.info("workers.stopping", queues=names, reason="signal" if stopped in done else "failure")
    await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
    results = await asyncio.gather(*runs, return_exceptions=True)
    stopped.cancel()
    await engine.dispose()
    await objects.close()
    if resources.redis is not None:
        await resources.redis.aclose()
    log.info("workers.stopped", queues=names)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures and not stop.is_set():
        raise failures[0]
