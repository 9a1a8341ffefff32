"""`usage_record`: one row per request the gateway answered, appended in batches by
`control_plane.usage.recorder.UsageRecorder` and never changed afterwards.

Like the audit log, the rows name tenants, projects, keys and endpoints by id without
foreign keys: the log must accept every batch (a row may outlive what it names, and one
bad reference would otherwise reject the 499 good rows inserted with it), and inserts
stay cheap. `created_at` is when the request finished; the queries read time ranges of
one project, one key or one tenant, hence one index for each.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Index
from sqlmodel import Field

from control_plane.core.db import TableBase

# Longer names (a client may send any `model`) are cut to this when the row is written.
MAX_NAME = 255


class UsageRecord(TableBase, table=True):
    __tablename__ = "usage_record"
    __table_args__ = (
        Index("ix_usage_record_project_id_created_at", "project_id", "created_at"),
        Index("ix_usage_record_api_key_id_created_at", "api_key_id", "created_at"),
        Index("ix_usage_record_tenant_id_created_at", "tenant_id", "created_at"),
    )

    tenant_id: uuid.UUID
    project_id: uuid.UUID
    api_key_id: uuid.UUID
    # The `model` the client asked for: a router or an endpoint name.
    route: str = Field(max_length=MAX_NAME)
    # The endpoint that answered (or last tried); "" when the request reached none.
    target: str = Field(default="", max_length=MAX_NAME)
    endpoint_id: uuid.UUID | None = None
    # The HTTP status the client got.
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # From the request's arrival to the end of its response.
    latency_ms: float
    # Streams: from the request's arrival to the first byte of the answer.
    ttft_ms: float | None = None
    stream: bool = False
