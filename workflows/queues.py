"""Task-queue names of the six worker pools.

Every queue name may carry a deployment prefix (`CP_TEMPORAL__TASK_QUEUE_PREFIX`) so
several stacks, or tests, share one Temporal namespace. The starter puts the prefix in
the workflow's memo (`QUEUE_PREFIX_MEMO`); workflows read it from there, so no setting
enters workflow code and replays see the same value.
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
QUEUE_PREFIX_MEMO = "cp_queue_prefix"
# The resource (kind, id, tenant, project) a run acts on, as the starter saw it.
RESOURCE_MEMO = "cp_resource"


def task_queue(queue: Queue, prefix: str = "") -> str:
    return f"{prefix}{queue.value}"


def parse_queue(name: str) -> Queue:
    try:
        return Queue(name)
    except ValueError:
        valid = ", ".join(q.value for q in Queue)
        raise ValueError(f"unknown queue {name!r}; valid queues: {valid}") from None
