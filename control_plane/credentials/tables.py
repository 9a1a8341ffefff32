"""Provider and cloud credentials, encrypted at rest (envelope encryption)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Index, LargeBinary, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class Credential(TableBase, table=True):
    __tablename__ = "credential"
    __table_args__ = (
        # Names are unique among live credentials, so a deleted one frees its name; a
        # tenant-wide credential (no project) is unique by name too.
        Index(
            "uq_credential_live_name",
            "tenant_id",
            "project_id",
            "name",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_where=text("status <> 'deleted'"),
        ),
    )

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    # None: shared by every project of the tenant (tenant admins manage those).
    project_id: uuid.UUID | None = Field(default=None, foreign_key="project.id", index=True)
    name: str = Field(max_length=255)
    provider: str = Field(max_length=32)
    # Non-secret fields (base URL, region, organisation...) in clear.
    config: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    # Secret fields, masked for display (`sk-...abcd`).
    masked: dict[str, str] = Field(default_factory=dict, sa_type=JSONB)
    # AES-GCM of the JSON of secret fields under a random data key (all four emptied
    # when the credential is deleted: the secret is destroyed, the row stays)...
    ciphertext: bytes = Field(sa_type=LargeBinary)
    nonce: bytes = Field(sa_type=LargeBinary)
    # ...and that data key, wrapped (AES-GCM) by the master key `master_key_id`.
    wrapped_key: bytes = Field(sa_type=LargeBinary)
    key_nonce: bytes = Field(sa_type=LargeBinary)
    master_key_id: str = Field(max_length=64)
    status: str = Field(default="active", max_length=16)
    created_by: uuid.UUID | None = Field(default=None, foreign_key="user_account.id")
