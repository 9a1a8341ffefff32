from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    tenant_id: uuid.UUID | None
    project_id: uuid.UUID | None
    actor_kind: str
    actor_id: str | None
    action: str
    resource_kind: str
    resource_id: str | None
    outcome: str
    request_id: str | None
    details: dict[str, Any]
    occurred_at: datetime
    hash: str
