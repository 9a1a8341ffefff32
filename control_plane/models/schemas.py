"""Request and response bodies of the models, license policy and catalog APIs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from control_plane.core.pagination import Page
from control_plane.credentials.providers import HTTP_URL_PATTERN
from control_plane.identity.schemas import NO_NUL_PATTERN
from workflows.contracts.models import (
    Finding,
    LicenseDecision,
    ModelMetadataInfo,
    ModelStatus,
    SourceKind,
    Verdict,
)

# Explicit classes, not `\w`/`\S`: Python, pydantic and JSON Schema clients disagree on
# what those match beyond ASCII.
CLOUD_REF_PATTERN = r"^[A-Za-z0-9_\-]+/[!-~]+$"

ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/:]*$")
]
SourceRef = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
Revision = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.\-/]+$")
]


class _ModelCreateBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ModelName
    project_id: uuid.UUID | None = Field(
        default=None, description="The owning project; empty: shared by the whole tenant."
    )
    credential_id: uuid.UUID | None = Field(
        default=None,
        description="A credential of the project or tenant: a Hugging Face token, AWS keys "
        "for S3, or the cloud provider's API key.",
    )


class HuggingFaceModelCreate(_ModelCreateBase):
    source_kind: Literal[SourceKind.HUGGINGFACE]
    source_ref: Annotated[
        str,
        StringConstraints(
            min_length=3, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$"
        ),
    ] = Field(description="The repository id, `org/name`")
    revision: Revision = Field(
        default="main", description="Branch, tag or commit; pinned to its commit sha"
    )


class LocalModelCreate(_ModelCreateBase):
    source_kind: Literal[SourceKind.LOCAL]
    source_ref: SourceRef = Field(
        description="An absolute directory path on the machine the model workers run on"
    )


class S3ModelCreate(_ModelCreateBase):
    source_kind: Literal[SourceKind.S3]
    source_ref: Annotated[str, StringConstraints(pattern=r"^s3://[a-z0-9.\-]{3,63}(/.*)?$")] = (
        Field(description="`s3://bucket/prefix`")
    )
    endpoint: Annotated[str, StringConstraints(pattern=HTTP_URL_PATTERN)] | None = Field(
        default=None, description="An S3-compatible endpoint (MinIO...); default AWS"
    )
    region: str | None = Field(default=None, max_length=64)


class UrlModelCreate(_ModelCreateBase):
    source_kind: Literal[SourceKind.URL]
    source_ref: Annotated[str, StringConstraints(max_length=2048, pattern=HTTP_URL_PATTERN)] = (
        Field(description="The URL of a model file")
    )


class CloudModelCreate(_ModelCreateBase):
    source_kind: Literal[SourceKind.CLOUD]
    credential_id: uuid.UUID = Field(
        description="The provider's API key credential (of the project or the tenant)"
    )
    source_ref: Annotated[
        str, StringConstraints(min_length=3, max_length=300, pattern=CLOUD_REF_PATTERN)
    ] = Field(description="`provider/model_id` from the catalog, e.g. `openai/gpt-4o`")


ModelCreate = Annotated[
    HuggingFaceModelCreate | LocalModelCreate | S3ModelCreate | UrlModelCreate | CloudModelCreate,
    Field(discriminator="source_kind"),
]


class ArtifactRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    path: str
    size: int
    sha256: str
    object_key: str


class ScanReportRead(BaseModel):
    scanner: str
    version: str
    verdict: Verdict
    findings: list[Finding]
    files_scanned: int
    bytes_scanned: int
    scanned_at: datetime


class LicenseRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    spdx_id: str
    source_file: str | None
    evidence: str | None
    decision: LicenseDecision
    decided_by: str | None
    decided_by_name: str | None
    reason: str | None
    decided_at: datetime | None


class ModelRead(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID | None
    name: str
    source_kind: SourceKind
    source_ref: str
    revision: str | None
    pinned_revision: str | None
    credential_id: uuid.UUID | None
    status: ModelStatus
    status_reason: str
    modality: str | None
    endpoints: list[str]
    file_count: int
    total_bytes: int
    created_at: datetime
    updated_at: datetime
    workflow_id: str | None = None

    @classmethod
    def of(cls, row: Any, *, workflow_id: str | None = None) -> ModelRead:
        return cls.model_validate(
            {**row.model_dump(), "workflow_id": workflow_id}, from_attributes=False
        )


class ModelDetail(ModelRead):
    artifacts: list[ArtifactRead] = Field(default_factory=list)
    scan: ScanReportRead | None = None
    license: LicenseRead | None = None
    metadata: ModelMetadataInfo | None = None


ModelList = Page[ModelRead]


class LicenseReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL_PATTERN)


class LicensePolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow: list[
        Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL_PATTERN)]
    ] = Field(default_factory=list, max_length=500)
    deny: list[
        Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL_PATTERN)]
    ] = Field(default_factory=list, max_length=500)
    require_approval: list[
        Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL_PATTERN)]
    ] = Field(default_factory=list, max_length=500)
    default: Literal[
        LicenseDecision.ALLOW, LicenseDecision.DENY, LicenseDecision.REQUIRE_APPROVAL
    ] = LicenseDecision.REQUIRE_APPROVAL


class CatalogRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    provider: str
    model_id: str
    display_name: str | None
    modality: str
    endpoints: list[str]
    context_window: int | None
    max_output_tokens: int | None
    input_price_per_mtok: float | None
    output_price_per_mtok: float | None
    status: str
    origin: str
    last_seen_at: datetime | None


CatalogList = Page[CatalogRead]
