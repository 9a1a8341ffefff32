"""Payloads of the `DiagnoseSystem` workflow."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from workflows.contracts.common import Integer
from workflows.queues import ALL_QUEUES, Queue


class DiagnoseRequest(BaseModel):
    queues: list[Queue] = Field(default_factory=lambda: list(ALL_QUEUES), min_length=1)
    # How long to wait for a worker of each pool to pick up the ping.
    timeout_seconds: Integer = Field(default=30, ge=1, le=3600)


class PingRequest(BaseModel):
    queue: Queue


class PoolPing(BaseModel):
    queue: Queue
    task_queue: str
    worker_host: str
    worker_pid: int
    version: str
    answered_at: datetime


class PoolFailure(BaseModel):
    queue: Queue
    reason: str


class DiagnoseResult(BaseModel):
    healthy: bool
    answered: list[PoolPing] = Field(default_factory=list)
    failed: list[PoolFailure] = Field(default_factory=list)
