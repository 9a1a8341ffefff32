"""The model pools' Temporal Schedules, created or updated at worker start-up.

- `cloud-model-sync`: `SyncCloudModels` for every tenant, daily by default.
- `model-rescan`: `RescanModels`, which re-scans the models whose last scan was made by
  another scanner version (nothing to do, and quick, when the version did not change).

Both skip a run while the previous one is still going. Operators pause, trigger or
edit them in the Temporal UI (Schedules) or with `temporal schedule ...`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from control_plane.core.logging import get_logger
from control_plane.core.temporal import search_attributes
from workflows.contracts.common import ResourceRef
from workflows.contracts.models import (
    CATALOG_SYNC_SCHEDULE,
    RESCAN_SCHEDULE,
    CatalogSyncRequest,
    RescanRequest,
)
from workflows.queues import QUEUE_PREFIX_MEMO, RESOURCE_MEMO, Queue, task_queue

log = get_logger(__name__)


def _schedule(
    workflow: str,
    payload: Any,
    workflow_id: str,
    resource: ResourceRef,
    every: timedelta,
    prefix: str,
) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            workflow,
            payload,
            id=workflow_id,
            task_queue=task_queue(Queue.ORCHESTRATION, prefix),
            memo={QUEUE_PREFIX_MEMO: prefix, RESOURCE_MEMO: resource},
            typed_search_attributes=search_attributes(resource),
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


def model_schedules(
    prefix: str, *, sync_every: timedelta, rescan_every: timedelta
) -> dict[str, Schedule]:
    return {
        f"{prefix}{CATALOG_SYNC_SCHEDULE}": _schedule(
            "SyncCloudModels",
            CatalogSyncRequest(),
            f"{prefix}{CATALOG_SYNC_SCHEDULE}",
            ResourceRef(kind="catalog"),
            sync_every,
            prefix,
        ),
        f"{prefix}{RESCAN_SCHEDULE}": _schedule(
            "RescanModels",
            RescanRequest(),
            f"{prefix}{RESCAN_SCHEDULE}",
            ResourceRef(kind="model"),
            rescan_every,
            prefix,
        ),
    }


async def ensure_model_schedules(
    client: Client,
    prefix: str = "",
    *,
    sync_every: timedelta = timedelta(days=1),
    rescan_every: timedelta = timedelta(days=1),
) -> list[str]:
    """Create the schedules, or bring existing ones to this definition (keeping their
    paused state and history). Returns their ids."""
    schedules = model_schedules(prefix, sync_every=sync_every, rescan_every=rescan_every)
    for schedule_id, schedule in schedules.items():
        try:
            await client.create_schedule(schedule_id, schedule)
            log.info("models.schedule.created", schedule_id=schedule_id)
        except ScheduleAlreadyRunningError:

            def update(current: ScheduleUpdateInput, wanted: Schedule = schedule) -> ScheduleUpdate:
                wanted.state = current.description.schedule.state
                return ScheduleUpdate(schedule=wanted)

            await client.get_schedule_handle(schedule_id).update(update)
            log.info("models.schedule.updated", schedule_id=schedule_id)
    return list(schedules)
