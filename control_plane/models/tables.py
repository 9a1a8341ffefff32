"""AI models and what onboarding learns about them: artifacts (files in the object store),
scan reports, the license decision and the metadata; the tenant's license policy; and
the catalog of cloud models.

A model belongs to a project, or to the whole tenant when `project_id` is empty.
Artifacts are content-addressed: two models with the same file share one object.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from control_plane.core.db import TableBase


class Model(TableBase, table=True):
    __tablename__ = "model"
    __table_args__ = (
        Index(
            "uq_model_live_name",
            "tenant_id",
            "project_id",
            "name",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_where=text("status <> 'deleted'"),
        ),
    )

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    project_id: uuid.UUID | None = Field(default=None, foreign_key="project.id", index=True)
    name: str = Field(max_length=255)
    source_kind: str = Field(max_length=16)
    # HF repo id, local directory, s3://bucket/prefix, URL(s), or provider/model for cloud.
    source_ref: str = Field(max_length=2048)
    # What was asked for (branch, tag or sha) and the commit it resolved to.
    revision: str | None = Field(default=None, max_length=255)
    pinned_revision: str | None = Field(default=None, max_length=255)
    # HF token, AWS keys or the cloud provider's API key.
    credential_id: uuid.UUID | None = Field(default=None, foreign_key="credential.id")
    # S3-compatible endpoint for `s3` sources.
    source_options: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    status: str = Field(default="onboarding", max_length=24, index=True)
    status_reason: str = Field(default="", max_length=2000)
    modality: str | None = Field(default=None, max_length=32)
    endpoints: list[str] = Field(default_factory=list, sa_type=JSONB)
    file_count: int = 0
    total_bytes: int = Field(default=0, sa_type=BigInteger)
    created_by: uuid.UUID | None = Field(default=None, foreign_key="user_account.id")


class ModelArtifact(TableBase, table=True):
    __tablename__ = "model_artifact"
    __table_args__ = (UniqueConstraint("model_id", "path"),)

    model_id: uuid.UUID = Field(foreign_key="model.id", index=True)
    path: str = Field(max_length=1024)
    size: int = Field(sa_type=BigInteger)
    sha256: str = Field(max_length=64, index=True)
    object_key: str = Field(max_length=1024)
    etag: str | None = Field(default=None, max_length=255)


class ScanReport(TableBase, table=True):
    __tablename__ = "scan_report"

    model_id: uuid.UUID = Field(foreign_key="model.id", index=True)
    scanner: str = Field(max_length=64)
    version: str = Field(max_length=32)
    verdict: str = Field(max_length=16)
    findings: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONB)
    files_scanned: int = 0
    bytes_scanned: int = Field(default=0, sa_type=BigInteger)


class ModelLicense(TableBase, table=True):
    __tablename__ = "model_license"

    model_id: uuid.UUID = Field(foreign_key="model.id", unique=True)
    spdx_id: str = Field(max_length=128)
    source_file: str | None = Field(default=None, max_length=1024)
    evidence: str | None = Field(default=None, max_length=1000)
    # allow | deny | require_approval | approved | rejected
    decision: str = Field(max_length=24)
    decided_by: str | None = Field(default=None, max_length=255)
    decided_by_name: str | None = Field(default=None, max_length=255)
    reason: str | None = Field(default=None, max_length=2000)
    decided_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ModelMetadata(TableBase, table=True):
    __tablename__ = "model_metadata"

    model_id: uuid.UUID = Field(foreign_key="model.id", unique=True)
    architecture: str | None = Field(default=None, max_length=255)
    parameter_count: int | None = Field(default=None, sa_type=BigInteger)
    dtype: str | None = Field(default=None, max_length=32)
    context_length: int | None = None
    quantization: str | None = Field(default=None, max_length=64)
    weights_bytes: int | None = Field(default=None, sa_type=BigInteger)
    kv_cache_bytes_per_token: int | None = Field(default=None, sa_type=BigInteger)
    # The whole ModelMetadataInfo, for fields without a column.
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)


class LicensePolicy(TableBase, table=True):
    __tablename__ = "license_policy"

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", unique=True)
    allow: list[str] = Field(default_factory=list, sa_type=JSONB)
    deny: list[str] = Field(default_factory=list, sa_type=JSONB)
    require_approval: list[str] = Field(default_factory=list, sa_type=JSONB)
    default: str = Field(default="require_approval", max_length=24)


class CatalogModel(TableBase, table=True):
    """A cloud model a tenant can onboard without download (per tenant: live lists come
    from the tenant's own provider credentials)."""

    __tablename__ = "catalog_model"
    __table_args__ = (UniqueConstraint("tenant_id", "provider", "model_id"),)

    tenant_id: uuid.UUID = Field(foreign_key="tenant.id", index=True)
    provider: str = Field(max_length=32)
    model_id: str = Field(max_length=255)
    display_name: str | None = Field(default=None, max_length=255)
    modality: str = Field(default="text", max_length=32)
    endpoints: list[str] = Field(default_factory=list, sa_type=JSONB)
    context_window: int | None = None
    max_output_tokens: int | None = None
    input_price_per_mtok: float | None = None
    output_price_per_mtok: float | None = None
    # available | deprecated
    status: str = Field(default="available", max_length=16)
    # bundled | live | both
    origin: str = Field(default="bundled", max_length=16)
    last_seen_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
