"""The one place a Temporal `Client` is built, plus start/lookup helpers.

Payloads go through the pydantic data converter. `codec` is the hook for payload
encryption: when given, every payload is encoded before it leaves the process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import temporalio.api.enums.v1 as enums
import temporalio.api.operatorservice.v1 as operator
from temporalio.client import Client, TLSConfig, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from control_plane.core.config import TemporalSettings
from control_plane.core.errors import Conflict, DependencyUnavailable
from control_plane.core.logging import get_logger
from workflows.contracts.common import (
    SA_PROJECT_ID,
    SA_RESOURCE_ID,
    SA_RESOURCE_KIND,
    SEARCH_ATTRIBUTE_KEYS,
    ResourceRef,
    RunStatus,
)
from workflows.queues import QUEUE_PREFIX_MEMO, RESOURCE_MEMO, Queue, task_queue

log = get_logger(__name__)

STATUS_MAP: dict[WorkflowExecutionStatus, RunStatus] = {
    WorkflowExecutionStatus.RUNNING: RunStatus.RUNNING,
    WorkflowExecutionStatus.COMPLETED: RunStatus.COMPLETED,
    WorkflowExecutionStatus.FAILED: RunStatus.FAILED,
    WorkflowExecutionStatus.CANCELED: RunStatus.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: RunStatus.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT: RunStatus.TIMED_OUT,
    WorkflowExecutionStatus.CONTINUED_AS_NEW: RunStatus.CONTINUED_AS_NEW,
}


def data_converter(codec: PayloadCodec | None = None) -> DataConverter:
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec)


async def connect(
    settings: TemporalSettings, *, codec: PayloadCodec | None = None, lazy: bool = False
) -> Client:
    """`lazy=True` defers the connection to the first call (the API starts while Temporal
    is down and reports it in `/readyz`)."""
    try:
        return await Client.connect(
            settings.address,
            namespace=settings.namespace,
            data_converter=data_converter(codec),
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            tls=TLSConfig() if settings.tls else False,
            lazy=lazy,
        )
    except RuntimeError as err:
        raise DependencyUnavailable(
            f"cannot reach Temporal at {settings.address}: {err}", dependency="temporal"
        ) from err


async def ensure_search_attributes(client: Client) -> list[str]:
    """Register our custom search attributes; returns the names it had to add."""
    existing = await client.operator_service.list_search_attributes(
        operator.ListSearchAttributesRequest(namespace=client.namespace)
    )
    known = set(existing.custom_attributes) | set(existing.system_attributes)
    missing = {
        key.name: enums.IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
        for key in SEARCH_ATTRIBUTE_KEYS
        if key.name not in known
    }
    if missing:
        try:
            await client.operator_service.add_search_attributes(
                operator.AddSearchAttributesRequest(
                    namespace=client.namespace, search_attributes=missing
                )
            )
        except RPCError as err:
            # Another process registered them between our list and add.
            if err.status != RPCStatusCode.ALREADY_EXISTS:
                raise
        log.info("temporal.search_attributes.registered", names=sorted(missing))
    return sorted(missing)


def search_attributes(resource: ResourceRef) -> TypedSearchAttributes:
    pairs: list[SearchAttributePair[Any]] = [SearchAttributePair(SA_RESOURCE_KIND, resource.kind)]
    if resource.id:
        pairs.append(SearchAttributePair(SA_RESOURCE_ID, resource.id))
    if resource.project_id:
        pairs.append(SearchAttributePair(SA_PROJECT_ID, str(resource.project_id)))
    return TypedSearchAttributes(pairs)


async def start_workflow(
    client: Client,
    workflow: str,
    payload: Any,
    *,
    workflow_id: str,
    resource: ResourceRef,
    queue_prefix: str = "",
    ensure: bool = False,
    result_type: type | None = None,
) -> WorkflowHandle[Any, Any]:
    """Start a workflow on the orchestration queue with our search attributes.

    `ensure=True` returns the running workflow with that id (USE_EXISTING); otherwise an
    already-running workflow is a 409.
    """
    try:
        return await client.start_workflow(
            workflow,
            payload,
            id=workflow_id,
            task_queue=task_queue(Queue.ORCHESTRATION, queue_prefix),
            search_attributes=search_attributes(resource),
            memo={QUEUE_PREFIX_MEMO: queue_prefix, RESOURCE_MEMO: resource},
            result_type=result_type,
            id_conflict_policy=(
                WorkflowIDConflictPolicy.USE_EXISTING if ensure else WorkflowIDConflictPolicy.FAIL
            ),
        )
    except WorkflowAlreadyStartedError as err:
        raise Conflict(
            f"workflow {workflow_id} is already running", workflow_id=workflow_id
        ) from err
    except RPCError as err:
        raise rpc_error(err) from err


def rpc_error(err: RPCError) -> Exception:
    if err.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
        return DependencyUnavailable(f"Temporal unavailable: {err.message}", dependency="temporal")
    return err
