"""Task-queue names of the six worker pools.

Every queue name may carry a deployment prefix (`CP_TEMPORAL__TASK_QUEUE_PREFIX`) so
several stacks, or tests, share one Temporal namespace. Workflows run on the
orchestration queue and derive the prefix from their own queue, so no setting ever
enters workflow code.
"""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    ORCHESTRATION = "cp-orchestration"
    CLUSTER = "cp-cluster"
    MODEL = "cp-model"
    DEPLOY = "cp-deploy"
    BENCHMARK = "cp-benchmark"
    SYNC = "cp-sync"


ALL_QUEUES: tuple[Queue, ...] = tuple(Queue)


def task_queue(queue: Queue, prefix: str = "") -> str:
    return f"{prefix}{queue.value}"


def prefix_of(orchestration_task_queue: str) -> str:
    """The deployment prefix, given the full name of an orchestration task queue."""
    if not orchestration_task_queue.endswith(Queue.ORCHESTRATION.value):
        raise ValueError(f"{orchestration_task_queue!r} is not an orchestration task queue")
    return orchestration_task_queue.removesuffix(Queue.ORCHESTRATION.value)


def parse_queue(name: str) -> Queue:
    try:
        return Queue(name)
    except ValueError:
        valid = ", ".join(q.value for q in Queue)
        raise ValueError(f"unknown queue {name!r}; valid queues: {valid}") from None
