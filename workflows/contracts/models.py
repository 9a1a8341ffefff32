"""Payloads of the model workflows (`OnboardModel`, `RescanModels`, `SyncCloudModels`)
and the results of the scanner, the license detector and metadata extraction.

Workflows carry ids, object keys and small reports, never file contents or secrets.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydantic import BaseModel, Field

from workflows.contracts.common import Integer

APPROVE_LICENSE_UPDATE = "approve_license"
REJECT_LICENSE_UPDATE = "reject_license"

# Failure types model activities raise as non-retryable `ApplicationError`s.
SOURCE_NOT_FOUND = "ModelSourceNotFound"
SOURCE_REFUSED = "ModelSourceRefused"
INTEGRITY_FAILED = "ModelIntegrityFailed"
MODEL_GONE = "ModelGone"
NON_RETRYABLE = [SOURCE_NOT_FOUND, SOURCE_REFUSED, INTEGRITY_FAILED, MODEL_GONE]


class SourceKind(StrEnum):
    HUGGINGFACE = "huggingface"
    LOCAL = "local"
    S3 = "s3"
    URL = "url"
    CLOUD = "cloud"


class ModelStatus(StrEnum):
    ONBOARDING = "onboarding"
    AWAITING_APPROVAL = "awaiting_approval"
    READY = "ready"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    DEPRECATED = "deprecated"
    DELETED = "deleted"


class Severity(StrEnum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Verdict(StrEnum):
    CLEAN = "clean"
    # Findings below critical: a human should look; the model is quarantined.
    SUSPICIOUS = "suspicious"
    MALICIOUS = "malicious"


class Finding(BaseModel):
    severity: Severity
    # Path of the file inside the model (for archives: `archive.pt:inner/data.pkl`).
    file: str
    # A stable short code (`pickle.global`, `safetensors.overlap`, `format.truncated`...).
    code: str
    detail: str


class ScanReport(BaseModel):
    scanner: str
    version: str
    verdict: Verdict
    findings: list[Finding] = Field(default_factory=list)
    files_scanned: int = 0
    bytes_scanned: int = 0


class SourceFile(BaseModel):
    """One file of a model source, as the source lists it."""

    path: str
    size: int
    # Known up front for Hugging Face LFS files and for files we already hashed.
    sha256: str | None = None
    etag: str | None = None


class LicenseDecision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"
    APPROVED = "approved"
    REJECTED = "rejected"


class LicenseInfo(BaseModel):
    # An SPDX id (`apache-2.0` style lowercased ids are normalised to `Apache-2.0`), or
    # `unknown`; `other:<name>` for named licenses without an SPDX id (`llama3`...).
    spdx_id: str = "unknown"
    # Where it was found: `README.md` (card metadata), `LICENSE`, `config.json`.
    source_file: str | None = None
    # The raw text that named it, for the approver.
    evidence: str | None = None


class MemoryEstimate(BaseModel):
    weights_bytes: int
    kv_cache_bytes_per_token: int
    context_length: int
    batch_size: int = 1
    total_bytes: int


class ModelMetadataInfo(BaseModel):
    architecture: str | None = None
    model_type: str | None = None
    parameter_count: int | None = None
    dtype: str | None = None
    context_length: int | None = None
    quantization: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    # Bytes of weights as stored (sum of tensor bytes, or file sizes for GGUF).
    weights_bytes: int | None = None
    kv_cache_bytes_per_token: int | None = None
    memory: MemoryEstimate | None = None
    # What the model can serve: `chat`, `completion`, `embedding`, `rerank`...
    endpoints: list[str] = Field(default_factory=list)
    modality: str | None = None


class LicenseReview(BaseModel):
    """Argument of the `approve_license` / `reject_license` updates."""

    reason: str = Field(min_length=1, max_length=2000, pattern=r"^[^\x00]*$")
    # Filled by the API from the caller; the validator refuses non-admins.
    actor_id: str | None = None
    actor_is_tenant_admin: bool = False
    actor_name: str | None = None


class DownloadProgress(BaseModel):
    """Heartbeat details of the download activity: where to resume."""

    file: str = ""
    offset: Integer = 0
    files_done: list[str] = Field(default_factory=list)
    # Files downloaded concurrently: bytes on disk per file in flight.
    offsets: dict[str, int] = Field(default_factory=dict)


class ModelRef(BaseModel):
    model_id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID | None = None


DOWNLOAD_PROGRESS_SIGNAL = "download_progress"
CATALOG_SYNC_SCHEDULE = "cloud-model-sync"
RESCAN_SCHEDULE = "model-rescan"


class OnboardModelRequest(BaseModel):
    model: ModelRef
    source_kind: SourceKind
    # How long a model may wait for a license decision before onboarding gives up.
    approval_timeout_days: Integer = Field(default=30, ge=1, le=365)


class ResolvedModel(BaseModel):
    revision: str | None = None
    files: list[SourceFile] = Field(default_factory=list)
    total_bytes: int = 0
    license: LicenseInfo = Field(default_factory=LicenseInfo)


class LicenseCheck(BaseModel):
    model: ModelRef
    license: LicenseInfo


class TenantList(BaseModel):
    tenant_ids: list[uuid.UUID] = Field(default_factory=list)


class LicenseVerdict(BaseModel):
    decision: LicenseDecision
    spdx_id: str
    reason: str = ""


class LicenseOutcome(BaseModel):
    """What the workflow records once a reviewer decided."""

    model_id: uuid.UUID
    decision: LicenseDecision
    review: LicenseReview


class DownloadRequest(BaseModel):
    model: ModelRef
    files: list[SourceFile]


class DownloadResult(BaseModel):
    files: int
    bytes_total: int
    bytes_fetched: int
    files_reused: int = 0


class DownloadProgressUpdate(BaseModel):
    """Signalled by the download activity so the `progress` query shows bytes and files."""

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    current_file: str | None = None


class ModelStatusChange(BaseModel):
    model_id: uuid.UUID
    status: ModelStatus
    reason: str = ""
    unless_in: list[ModelStatus] = Field(default_factory=list)


class OnboardModelResult(BaseModel):
    status: ModelStatus
    reason: str = ""


class RescanRequest(BaseModel):
    # Empty: every model whose latest scan was made by another scanner version.
    model_ids: list[uuid.UUID] = Field(default_factory=list)
    force: bool = False


class RescanTarget(BaseModel):
    model_id: uuid.UUID
    tenant_id: uuid.UUID


class RescanPlan(BaseModel):
    scanner_version: str
    targets: list[RescanTarget] = Field(default_factory=list)


class RescanResult(BaseModel):
    scanner_version: str
    rescanned: int
    quarantined: int
    released: int


class CatalogSyncRequest(BaseModel):
    # Empty: every tenant.
    tenant_ids: list[uuid.UUID] = Field(default_factory=list)


class CatalogSyncResult(BaseModel):
    tenants: int = 0
    added: int = 0
    updated: int = 0
    deprecated: int = 0
    providers_checked: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


def onboard_model_workflow_id(model_id: uuid.UUID) -> str:
    return f"model-onboard-{model_id}"


def rescan_workflow_id(model_id: uuid.UUID) -> str:
    return f"model-rescan-{model_id}"
