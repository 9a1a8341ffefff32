"""Activities that describe the worker itself (used by `DiagnoseSystem`)."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from temporalio import activity

from workflows.contracts.system import PingRequest, PoolPing
from workflows.system import PING_ACTIVITY


def _version() -> str:
    try:
        return version("control-plane")
    except PackageNotFoundError:
        return "unknown"


class SystemActivities:
    @activity.defn(name=PING_ACTIVITY)
    async def ping_pool(self, request: PingRequest) -> PoolPing:
        return PoolPing(
            queue=request.queue,
            task_queue=activity.info().task_queue,
            worker_host=socket.gethostname(),
            worker_pid=os.getpid(),
            version=_version(),
            answered_at=datetime.now(UTC),
        )
