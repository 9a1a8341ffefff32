"""Model activities: resolve, download, scan and describe models (the `cp-model` pool),
sync the cloud catalog (`cp-sync`), and the status and license bookkeeping the model
workflows need (the orchestration pool).

Credentials are revealed just before use and never returned, logged or heartbeaten.
Source problems that retrying cannot fix are non-retryable `ApplicationError`s typed
from the contracts; outages are retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from control_plane.core.config import ModelSettings
from control_plane.core.db import session_scope
from control_plane.core.errors import NotFound
from control_plane.core.logging import get_logger
from control_plane.core.storage import FileObjectStore, ObjectStore, content_key
from control_plane.credentials.crypto import Vault
from control_plane.credentials.repository import CredentialRepository
from control_plane.credentials.service import reveal
from control_plane.identity.tables import Tenant
from control_plane.models import licenses, metadata, scanner, sources
from control_plane.models.catalog import (
    CatalogEntry,
    diff_catalog,
    load_bundled_catalog,
    merge_catalog,
)
from control_plane.models.repository import ModelRepository
from control_plane.models.scanner.modelscan_merge import modelscan_findings
from control_plane.models.service import LocalSourceRefused, check_local_root
from control_plane.models.tables import (
    CatalogModel,
    LicensePolicy,
    Model,
    ModelArtifact,
    ModelLicense,
    ModelMetadata,
)
from control_plane.models.tables import ScanReport as ScanReportRow
from workflows.contracts.models import (
    DOWNLOAD_PROGRESS_SIGNAL,
    INTEGRITY_FAILED,
    MODEL_GONE,
    SOURCE_NOT_FOUND,
    SOURCE_REFUSED,
    CatalogSyncRequest,
    CatalogSyncResult,
    DownloadProgress,
    DownloadProgressUpdate,
    DownloadRequest,
    DownloadResult,
    LicenseCheck,
    LicenseDecision,
    LicenseOutcome,
    LicenseVerdict,
    ModelMetadataInfo,
    ModelRef,
    ModelStatus,
    ModelStatusChange,
    RescanPlan,
    RescanRequest,
    RescanTarget,
    ResolvedModel,
    ScanReport,
    SourceFile,
    SourceKind,
    TenantList,
)

log = get_logger(__name__)

# Small text files onboarding reads for license detection and metadata.
TEXT_FILES = ("readme.md", "license", "license.md", "license.txt", "copying", "config.json")
TEXT_FILE_MAX_BYTES = 1024 * 1024
# Weights in other frameworks' formats, not needed to serve the model.
SKIPPED_PREFIXES = ("onnx/", "openvino/", "coreml/", ".git/")
SKIPPED_SUFFIXES = (".h5", ".msgpack", ".ot", ".tflite", ".onnx", ".mlmodel")
# PyTorch weights are skipped when the same model ships safetensors.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth")
HEARTBEAT_SECONDS = 2.0
# Files of one model downloaded at once (big repositories are split into shards).
PARALLEL_DOWNLOADS = 4
SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024
DEFAULT_ENDPOINTS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
}
LIVE_PROVIDERS = ("openai", "anthropic")


def _permanent(message: str, kind: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def _source_error(err: sources.SourceError) -> ApplicationError:
    if isinstance(err, sources.SourceNotFound):
        return _permanent(str(err), SOURCE_NOT_FOUND)
    if isinstance(err, sources.SourceRefused):
        return _permanent(str(err), SOURCE_REFUSED)
    if isinstance(err, sources.IntegrityError):
        # The staging file was dropped: a retry downloads it again from scratch.
        return ApplicationError(str(err), type=INTEGRITY_FAILED)
    return ApplicationError(str(err), type="ModelSourceUnavailable")


def needed_files(files: list[SourceFile]) -> list[SourceFile]:
    """What serving the model needs: no other frameworks' weights, and no pickled
    PyTorch weights when safetensors are there."""
    kept = [
        f
        for f in files
        if not f.path.startswith(SKIPPED_PREFIXES) and not f.path.endswith(SKIPPED_SUFFIXES)
    ]
    if any(f.path.endswith(".safetensors") for f in kept):
        kept = [f for f in kept if not f.path.endswith(PICKLED_WEIGHTS)]
    return kept


@dataclass
class SourceContext:
    model: Model
    source: sources.ModelSource
    token: str | None = None
    s3: sources.S3Access | None = None


class ModelActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        vault: Vault,
        objects: ObjectStore,
        settings: ModelSettings,
        *,
        staging_dir: Path,
    ) -> None:
        self.sessions = sessions
        self.vault = vault
        self.objects = objects
        self.settings = settings
        self.staging_dir = staging_dir

    # ---------------------------------------------------------------- helpers

    async def _model(self, model_id: uuid.UUID) -> Model:
        async with session_scope(self.sessions) as session:
            row = await ModelRepository(session).get(model_id)
        if row is None:
            raise _permanent(f"model {model_id} does not exist", MODEL_GONE)
        return row

    async def _context(self, ref: ModelRef) -> SourceContext:
        row = await self._model(ref.model_id)
        kind = SourceKind(row.source_kind)
        options = row.source_options or {}
        try:
            source = sources.ModelSource(
                kind=kind,
                ref=row.source_ref,
                revision=(row.pinned_revision or row.revision)
                if kind is SourceKind.HUGGINGFACE
                else None,
                endpoint=options.get("endpoint") if kind is SourceKind.S3 else None,
                region=options.get("region") if kind is SourceKind.S3 else None,
            )
        except ValueError as err:
            raise _permanent(f"the model's source is invalid: {err}", SOURCE_REFUSED) from None
        if kind is SourceKind.LOCAL:
            try:
                check_local_root(row.source_ref, self.settings.local_roots)
            except LocalSourceRefused as err:
                raise _permanent(str(err), SOURCE_REFUSED) from None
        context = SourceContext(model=row, source=source)
        if row.credential_id is not None:
            try:
                async with session_scope(self.sessions) as session:
                    fields = await reveal(
                        session,
                        self.vault,
                        row.credential_id,
                        tenant_id=row.tenant_id,
                        project_id=row.project_id,
                    )
            except NotFound:
                raise _permanent(
                    f"credential {row.credential_id} no longer exists", SOURCE_REFUSED
                ) from None
            if fields.get("provider") == "huggingface":
                context.token = str(fields["token"])
            elif fields.get("provider") == "aws":
                endpoint = options.get("endpoint")
                context.s3 = sources.S3Access(
                    endpoint=endpoint,
                    access_key=str(fields["access_key_id"]),
                    secret_key=str(fields["secret_access_key"]),
                    region=options.get("region") or fields.get("region"),
                    secure=not str(endpoint or "https").startswith("http://"),
                    session_token=fields.get("session_token"),
                )
        elif kind is SourceKind.S3 and options.get("endpoint"):
            endpoint = str(options["endpoint"])
            context.s3 = sources.S3Access(
                endpoint=endpoint, secure=not endpoint.startswith("http://")
            )
        return context

    def _kwargs(self, context: SourceContext) -> dict[str, Any]:
        return {"token": context.token, "hf_endpoint": self.settings.hf_endpoint, "s3": context.s3}

    async def _resolved(self, context: SourceContext) -> sources.Resolved:
        try:
            return await sources.resolve(context.source, **self._kwargs(context))
        except sources.SourceError as err:
            raise _source_error(err) from None

    async def _read_text(
        self, context: SourceContext, resolved: sources.Resolved, file: SourceFile
    ) -> str | None:
        chunks: list[bytes] = []
        try:
            async for chunk in sources.open_file(
                context.source, resolved, file, **self._kwargs(context)
            ):
                chunks.append(chunk)
        except sources.SourceError:
            return None
        return b"".join(chunks).decode("utf-8", errors="replace")

    @contextlib.asynccontextmanager
    async def _local_copy(self, key: str, name: str) -> AsyncIterator[Path]:
        """A path on this machine holding the object (the file itself for the file store)."""
        if isinstance(self.objects, FileObjectStore):
            yield self.objects.path_for(key)
            return
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.staging_dir) as folder:
            path = Path(folder) / PurePosixPath(name).name
            with path.open("wb") as out:
                async with contextlib.aclosing(self.objects.get_stream(key)) as stream:
                    async for chunk in stream:
                        await asyncio.to_thread(out.write, chunk)
            yield path

    # ------------------------------------------------------------- cp-model

    @activity.defn(name="resolve_model")
    async def resolve_model(self, ref: ModelRef) -> ResolvedModel:
        row = await self._model(ref.model_id)
        if row.source_kind == SourceKind.CLOUD.value:
            return await self._resolve_cloud(row)
        context = await self._context(ref)
        resolved = await self._resolved(context)
        files = needed_files(resolved.files)
        texts: dict[str, str] = {}
        for file in resolved.files:
            if file.path.lower() in TEXT_FILES and file.size <= TEXT_FILE_MAX_BYTES:
                text = await self._read_text(context, resolved, file)
                if text is not None:
                    texts[file.path] = text
        config = _json_object(texts.get("config.json"))
        license_info = licenses.detect_license(card=resolved.card, files=texts, config=config)
        async with session_scope(self.sessions) as session:
            model = await ModelRepository(session).get(ref.model_id, for_update=True)
            if model is None:
                raise _permanent(f"model {ref.model_id} does not exist", MODEL_GONE)
            model.pinned_revision = resolved.revision
            model.file_count = len(files)
            model.total_bytes = sum(f.size for f in files)
            # Kept for metadata extraction (pipeline tag, library, tags): small.
            model.source_options = {
                **(model.source_options or {}),
                "card": _small_card(resolved.card),
                "config": config,
            }
            session.add(model)
        return ResolvedModel(
            revision=resolved.revision,
            files=files,
            total_bytes=sum(f.size for f in files),
            license=license_info,
        )

    async def _resolve_cloud(self, row: Model) -> ResolvedModel:
        provider, _, name = row.source_ref.partition("/")
        async with session_scope(self.sessions) as session:
            entry = await ModelRepository(session).catalog_entry(row.tenant_id, provider, name)
            if entry is None:
                raise _permanent(f"{row.source_ref} is not in the catalog", SOURCE_NOT_FOUND)
            info = ModelMetadataInfo(
                context_length=entry.context_window,
                endpoints=list(entry.endpoints),
                modality=entry.modality,
            )
            await _save_metadata(session, row.id, info)
        return ResolvedModel()

    @activity.defn(name="download_model")
    async def download_model(self, request: DownloadRequest) -> DownloadResult:
        context = await self._context(request.model)
        resolved = await self._resolved(context)
        details = activity.info().heartbeat_details
        resume = DownloadProgress.model_validate(details[0]) if details else DownloadProgress()
        offsets = dict(resume.offsets)
        if resume.file:
            offsets.setdefault(resume.file, resume.offset)
        done: list[str] = list(resume.files_done)
        staging = self.staging_dir / str(request.model.model_id)
        staging.mkdir(parents=True, exist_ok=True)
        total = sum(f.size for f in request.files)
        progress = _Progress(total=total, files_total=len(request.files), done=done)
        progress.finished_bytes = sum(f.size for f in request.files if f.path in done)
        counts = {"fetched": 0, "reused": 0}
        slots = asyncio.Semaphore(PARALLEL_DOWNLOADS)

        async def one(file: SourceFile) -> None:
            async with slots:
                listed = _listed(resolved, file)
                stored = await self._reuse(context.model, listed)
                if stored is None:
                    offset = offsets.get(file.path, 0)
                    progress.offsets[file.path] = offset

                    def on_progress(count: int) -> None:
                        progress.offsets[file.path] = count

                    try:
                        result = await sources.download_file(
                            context.source,
                            resolved,
                            listed,
                            self.objects,
                            staging_dir=staging,
                            resume_offset=offset,
                            on_progress=on_progress,
                            **self._kwargs(context),
                        )
                    except sources.SourceError as err:
                        raise _source_error(err) from None
                    counts["fetched"] += max(0, result.size - offset)
                    stored = ModelArtifact(
                        model_id=context.model.id,
                        path=file.path,
                        size=result.size,
                        sha256=result.sha256,
                        object_key=result.key,
                        etag=listed.etag,
                    )
                else:
                    counts["reused"] += 1
                async with session_scope(self.sessions) as session:
                    await ModelRepository(session).save_artifact(stored)
                progress.offsets.pop(file.path, None)
                progress.finished_bytes += stored.size
                done.append(file.path)

        beat = asyncio.create_task(progress.beat())
        try:
            async with asyncio.TaskGroup() as group:
                for file in request.files:
                    if file.path not in done:
                        group.create_task(one(file))
        except* Exception as errors:
            # One file's failure stops the others; report it, not the group.
            raise errors.exceptions[0] from None
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        await progress.signal()
        shutil.rmtree(staging, ignore_errors=True)
        return DownloadResult(
            files=len(request.files),
            bytes_total=total,
            bytes_fetched=counts["fetched"],
            files_reused=counts["reused"],
        )

    async def _reuse(self, model: Model, file: SourceFile) -> ModelArtifact | None:
        """An artifact stored earlier with the same content, so nothing is fetched."""
        sha256, key = file.sha256, None
        if sha256 is None:
            async with session_scope(self.sessions) as session:
                earlier = await ModelRepository(session).reusable_artifact(
                    model, file.path, file.size, file.etag
                )
            if earlier is None:
                return None
            sha256, key = earlier.sha256, earlier.object_key
        key = key or content_key(sha256)
        info = await self.objects.stat(key)
        if info is None or info.size != file.size:
            return None
        return ModelArtifact(
            model_id=model.id,
            path=file.path,
            size=file.size,
            sha256=sha256,
            object_key=key,
            etag=file.etag,
        )

    @activity.defn(name="scan_model")
    async def scan_model(self, ref: ModelRef) -> ScanReport:
        async with session_scope(self.sessions) as session:
            artifacts = list(await ModelRepository(session).artifacts(ref.model_id))
        findings = []
        scanned_bytes = 0
        for artifact in artifacts:
            activity.heartbeat(artifact.path)
            async with self._local_copy(artifact.object_key, artifact.path) as path:
                findings += await asyncio.to_thread(scanner.scan_file, path, name=artifact.path)
                if self.settings.merge_modelscan:
                    merged = await asyncio.to_thread(modelscan_findings, path)
                    findings += [f.model_copy(update={"file": artifact.path}) for f in merged]
            scanned_bytes += artifact.size
        report = ScanReport(
            scanner=scanner.SCANNER_NAME,
            version=scanner.SCANNER_VERSION,
            verdict=scanner.verdict_for(findings),
            findings=findings,
            files_scanned=len(artifacts),
            bytes_scanned=scanned_bytes,
        )
        async with session_scope(self.sessions) as session:
            session.add(
                ScanReportRow(
                    model_id=ref.model_id,
                    scanner=report.scanner,
                    version=report.version,
                    verdict=report.verdict.value,
                    findings=[f.model_dump(mode="json") for f in report.findings],
                    files_scanned=report.files_scanned,
                    bytes_scanned=report.bytes_scanned,
                )
            )
        return report

    @activity.defn(name="extract_model_metadata")
    async def extract_model_metadata(self, ref: ModelRef) -> ModelMetadataInfo:
        row = await self._model(ref.model_id)
        async with session_scope(self.sessions) as session:
            artifacts = list(await ModelRepository(session).artifacts(ref.model_id))
        options = row.source_options or {}
        config = options.get("config")
        tensors: dict[str, tuple[str, list[int]]] = {}
        gguf: dict[str, Any] | None = None
        for artifact in artifacts:
            if artifact.path.endswith(".safetensors"):
                tensors.update(await self._safetensors_tensors(artifact))
            elif artifact.path.endswith(".gguf") and gguf is None:
                async with self._local_copy(artifact.object_key, artifact.path) as path:
                    gguf = await asyncio.to_thread(_gguf_metadata, path)
        info = metadata.extract_metadata(
            config if isinstance(config, dict) else None,
            tensors or None,
            gguf=gguf,
            file_sizes={a.path: a.size for a in artifacts},
            card=options.get("card"),
        )
        memory = metadata.estimate_memory(info)
        if memory is not None:
            info.memory = memory
        async with session_scope(self.sessions) as session:
            await _save_metadata(session, ref.model_id, info)
        return info

    async def _safetensors_tensors(
        self, artifact: ModelArtifact
    ) -> dict[str, tuple[str, list[int]]]:
        head = await self.objects.get_bytes(artifact.object_key, length=8)
        if len(head) < 8:
            return {}
        (length,) = struct.unpack("<Q", head)
        if length > min(SAFETENSORS_HEADER_MAX, artifact.size - 8):
            return {}
        raw = await self.objects.get_bytes(artifact.object_key, offset=8, length=length)
        try:
            header = json.loads(raw)
        except ValueError:
            return {}
        if not isinstance(header, dict):
            return {}
        return {
            name: (str(entry["dtype"]), [int(d) for d in entry["shape"]])
            for name, entry in header.items()
            if name != "__metadata__"
            and isinstance(entry, dict)
            and "dtype" in entry
            and isinstance(entry.get("shape"), list)
        }

    @activity.defn(name="discard_model_artifacts")
    async def discard_model_artifacts(self, ref: ModelRef) -> int:
        """Cancelled onboarding: drop the model's artifacts and every stored object no
        other model uses, and the partial downloads."""
        async with session_scope(self.sessions) as session:
            unused = await ModelRepository(session).drop_artifacts(ref.model_id)
        for key in unused:
            await self.objects.delete(key)
        shutil.rmtree(self.staging_dir / str(ref.model_id), ignore_errors=True)
        return len(unused)

    # -------------------------------------------------------------- cp-sync

    @activity.defn(name="sync_tenant_catalog")
    async def sync_tenant_catalog(self, tenants: TenantList) -> CatalogSyncResult:
        result = CatalogSyncResult()
        for tenant_id in tenants.tenant_ids:
            one = await self._sync_tenant(tenant_id)
            result.tenants += 1
            result.added += one.added
            result.updated += one.updated
            result.deprecated += one.deprecated
            result.providers_checked = sorted(
                set(result.providers_checked) | set(one.providers_checked)
            )
            result.errors += one.errors
        return result

    async def _sync_tenant(self, tenant_id: uuid.UUID) -> CatalogSyncResult:
        live: dict[str, list[str]] = {}
        errors: list[str] = []
        for provider in LIVE_PROVIDERS:
            async with session_scope(self.sessions) as session:
                credential = await CredentialRepository(session).first_live(
                    tenant_id, None, provider
                )
                fields = (
                    await reveal(session, self.vault, credential.id, tenant_id=tenant_id)
                    if credential
                    else None
                )
            if fields is None:
                continue
            try:
                live[provider] = await _live_models(provider, fields)
            except (httpx.HTTPError, ValueError) as err:
                errors.append(f"{provider}: {err}")
        bundled = load_bundled_catalog()
        merged = merge_catalog(bundled, live)
        now = datetime.now(UTC)
        async with session_scope(self.sessions) as session:
            repo = ModelRepository(session)
            rows = {(r.provider, r.model_id): r for r in await repo.catalog(tenant_id)}
            current = {key: _entry_of(row) for key, row in rows.items()}
            diff = diff_catalog(current, merged, providers_checked=set(live))
            for entry in [*diff.added, *diff.updated]:
                row = rows.get((entry.provider, entry.model_id)) or CatalogModel(
                    tenant_id=tenant_id, provider=entry.provider, model_id=entry.model_id
                )
                _fill(row, entry)
                row.status = "deprecated" if entry.deprecated else "available"
                row.origin = entry.origin
                row.last_seen_at = now
                session.add(row)
            for entry in diff.vanished:
                row = rows[(entry.provider, entry.model_id)]
                # Deprecated, never deleted: models onboarded from it keep working.
                row.status = "deprecated"
                session.add(row)
        return CatalogSyncResult(
            tenants=1,
            added=len(diff.added),
            updated=len(diff.updated),
            deprecated=len(diff.vanished),
            providers_checked=sorted(live),
            errors=errors,
        )

    # ------------------------------------------------------- orchestration

    @activity.defn(name="set_model_status")
    async def set_model_status(self, change: ModelStatusChange) -> ModelStatus:
        async with session_scope(self.sessions) as session:
            row = await ModelRepository(session).get(change.model_id, for_update=True)
            if row is None:
                raise _permanent(f"model {change.model_id} does not exist", MODEL_GONE)
            current = ModelStatus(row.status)
            if current in change.unless_in:
                return current
            row.status = change.status.value
            row.status_reason = change.reason
            session.add(row)
        if current is not change.status:
            log.info(
                "models.status.changed",
                model_id=str(change.model_id),
                status=change.status.value,
                previous=current.value,
                reason=change.reason,
            )
        return change.status

    @activity.defn(name="decide_model_license")
    async def decide_model_license(self, check: LicenseCheck) -> LicenseVerdict:
        async with session_scope(self.sessions) as session:
            repo = ModelRepository(session)
            stored = await repo.policy(check.model.tenant_id)
            policy = _policy_of(stored)
            decision = licenses.decide(policy, check.license.spdx_id)
            row = await repo.license(check.model.model_id) or ModelLicense(
                model_id=check.model.model_id, spdx_id=check.license.spdx_id, decision=decision
            )
            row.spdx_id = check.license.spdx_id
            row.source_file = check.license.source_file
            row.evidence = check.license.evidence
            row.decision = decision.value
            row.decided_by = "policy" if decision is not LicenseDecision.REQUIRE_APPROVAL else None
            row.decided_at = datetime.now(UTC) if row.decided_by else None
            session.add(row)
        return LicenseVerdict(decision=decision, spdx_id=check.license.spdx_id)

    @activity.defn(name="record_license_review")
    async def record_license_review(self, outcome: LicenseOutcome) -> bool:
        async with session_scope(self.sessions) as session:
            row = await ModelRepository(session).license(outcome.model_id)
            if row is None:
                raise _permanent(f"model {outcome.model_id} has no license record", MODEL_GONE)
            row.decision = outcome.decision.value
            row.decided_by = outcome.review.actor_id or "temporal"
            row.decided_by_name = outcome.review.actor_name
            row.reason = outcome.review.reason
            row.decided_at = datetime.now(UTC)
            session.add(row)
        return True

    @activity.defn(name="models_to_rescan")
    async def models_to_rescan(self, request: RescanRequest) -> RescanPlan:
        async with session_scope(self.sessions) as session:
            rows = await ModelRepository(session).rescan_candidates(
                scanner.SCANNER_VERSION, request.model_ids, force=request.force
            )
        return RescanPlan(
            scanner_version=scanner.SCANNER_VERSION,
            targets=[RescanTarget(model_id=r.id, tenant_id=r.tenant_id) for r in rows],
        )

    @activity.defn(name="apply_scan_verdict")
    async def apply_scan_verdict(self, change: ModelStatusChange) -> str:
        """`quarantined`, `released` or `unchanged`: only ready and quarantined models move."""
        async with session_scope(self.sessions) as session:
            row = await ModelRepository(session).get(change.model_id, for_update=True)
            if row is None or row.status not in (
                ModelStatus.READY.value,
                ModelStatus.QUARANTINED.value,
            ):
                return "unchanged"
            if row.status == change.status.value:
                return "unchanged"
            row.status = change.status.value
            row.status_reason = change.reason
            session.add(row)
        return "quarantined" if change.status is ModelStatus.QUARANTINED else "released"

    @activity.defn(name="catalog_tenants")
    async def catalog_tenants(self, request: CatalogSyncRequest) -> TenantList:
        if request.tenant_ids:
            return TenantList(tenant_ids=request.tenant_ids)
        async with session_scope(self.sessions) as session:
            ids = (await session.exec(_tenant_ids())).all()
        return TenantList(tenant_ids=list(ids))


class _Progress:
    """Download progress shared by the downloads and the heartbeat task."""

    def __init__(self, *, total: int, files_total: int, done: list[str]) -> None:
        self.total = total
        self.files_total = files_total
        self.done = done
        self.finished_bytes = 0
        # Bytes on disk of each file in flight (what a retry resumes from).
        self.offsets: dict[str, int] = {}

    def details(self) -> DownloadProgress:
        return DownloadProgress(files_done=list(self.done), offsets=dict(self.offsets))

    async def beat(self) -> None:
        while True:
            activity.heartbeat(self.details().model_dump(mode="json"))
            await self.signal()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def signal(self) -> None:
        workflow_id = activity.info().workflow_id
        if workflow_id is None:
            return
        update = DownloadProgressUpdate(
            bytes_done=self.finished_bytes + sum(self.offsets.values()),
            bytes_total=self.total,
            files_done=len(self.done),
            files_total=self.files_total,
            current_file=", ".join(sorted(self.offsets)) or None,
        )
        # Progress is a courtesy to watchers: failing to report it never fails the download.
        with contextlib.suppress(Exception):
            await (
                activity.client()
                .get_workflow_handle(workflow_id)
                .signal(DOWNLOAD_PROGRESS_SIGNAL, update)
            )


def _listed(resolved: sources.Resolved, file: SourceFile) -> SourceFile:
    try:
        return resolved.file(file.path)
    except KeyError:
        raise _permanent(f"{file.path} is no longer in the source", SOURCE_NOT_FOUND) from None


def _json_object(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _small_card(card: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not card:
        return None
    encoded = json.dumps(card, default=str)
    return json.loads(encoded) if len(encoded) <= 64 * 1024 else None


def _gguf_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            meta, _ = scanner.read_gguf_header(handle)
    except (scanner.ModelFormatError, OSError):
        return None
    # Long arrays (token lists) are summaries; metadata needs the scalars only.
    return {k: v for k, v in meta.items() if not isinstance(v, scanner.GGUFArray)}


async def _save_metadata(
    session: AsyncSession, model_id: uuid.UUID, info: ModelMetadataInfo
) -> None:
    repo = ModelRepository(session)
    row = await repo.metadata(model_id) or ModelMetadata(model_id=model_id)
    row.architecture = info.architecture
    row.parameter_count = info.parameter_count
    row.dtype = info.dtype
    row.context_length = info.context_length
    row.quantization = info.quantization
    row.weights_bytes = info.weights_bytes
    row.kv_cache_bytes_per_token = info.kv_cache_bytes_per_token
    row.details = info.model_dump(mode="json")
    session.add(row)
    model = await repo.get(model_id)
    if model is not None:
        model.modality = info.modality
        model.endpoints = list(info.endpoints)
        session.add(model)


def _policy_of(row: LicensePolicy | None) -> licenses.LicensePolicy:
    if row is None:
        return licenses.DEFAULT_POLICY
    return licenses.LicensePolicy(
        allow=row.allow,
        deny=row.deny,
        require_approval=row.require_approval,
        default=LicenseDecision(row.default),
    )


def _entry_of(row: CatalogModel) -> CatalogEntry:
    return CatalogEntry(
        provider=row.provider,
        model_id=row.model_id,
        display_name=row.display_name,
        modality=row.modality,
        endpoints=list(row.endpoints),
        context_window=row.context_window,
        max_output_tokens=row.max_output_tokens,
        input_price_per_mtok=row.input_price_per_mtok,
        output_price_per_mtok=row.output_price_per_mtok,
        deprecated=row.status == "deprecated",
        origin=row.origin if row.origin in ("bundled", "live", "both") else "bundled",
    )


def _fill(row: CatalogModel, entry: CatalogEntry) -> None:
    row.display_name = entry.display_name
    row.modality = entry.modality
    row.endpoints = list(entry.endpoints)
    row.context_window = entry.context_window
    row.max_output_tokens = entry.max_output_tokens
    row.input_price_per_mtok = entry.input_price_per_mtok
    row.output_price_per_mtok = entry.output_price_per_mtok


async def _live_models(provider: str, fields: Mapping[str, Any]) -> list[str]:
    """Model ids from the provider's `/models` list, with the tenant's key."""
    base = str(fields.get("base_url") or DEFAULT_ENDPOINTS[provider]).rstrip("/")
    headers = (
        {"x-api-key": str(fields["api_key"]), "anthropic-version": "2023-06-01"}
        if provider == "anthropic"
        else {"Authorization": f"Bearer {fields['api_key']}"}
    )
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{base}/models", headers=headers)
        response.raise_for_status()
        body = response.json()
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("the provider's model list has no `data` array")
    log.info(
        "models.catalog.fetched",
        provider=provider,
        models=len(data),
        seconds=round(time.monotonic() - started, 2),
    )
    return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]


def _tenant_ids() -> Any:
    from sqlmodel import select

    return select(Tenant.id).where(Tenant.status == "active")
