"""Model lifecycle: `OnboardModel`, `RescanModels`, `SyncCloudModels`.

Heavy work (resolve, download, scan, metadata) runs on the `cp-model` pool; catalog
fetches on `cp-sync`; status writes on the orchestration pool. A license that needs
approval parks onboarding in `awaiting_approval` until an `approve_license` or
`reject_license` update arrives (from the API or the `temporal` CLI).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts.common import ResourceRef, RunStatus, StepStatus
    from workflows.contracts.models import (
        APPROVE_LICENSE_UPDATE,
        DOWNLOAD_PROGRESS_SIGNAL,
        NON_RETRYABLE,
        REJECT_LICENSE_UPDATE,
        CatalogSyncRequest,
        CatalogSyncResult,
        DownloadProgressUpdate,
        DownloadRequest,
        DownloadResult,
        LicenseCheck,
        LicenseDecision,
        LicenseOutcome,
        LicenseReview,
        LicenseVerdict,
        ModelMetadataInfo,
        ModelRef,
        ModelStatus,
        ModelStatusChange,
        OnboardModelRequest,
        OnboardModelResult,
        RescanPlan,
        RescanRequest,
        RescanResult,
        ResolvedModel,
        ScanReport,
        Severity,
        SourceKind,
        TenantList,
        Verdict,
    )
    from workflows.queues import Queue
    from workflows.tracking import TrackedWorkflow, queue_for

T = TypeVar("T")

RESOURCE_KIND = "model"
MODEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=8,
    non_retryable_error_types=NON_RETRYABLE,
)
DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=NON_RETRYABLE,
)
RESOLVE_TIMEOUT = timedelta(minutes=5)
# Downloads and scans can run for hours on big models; the heartbeat timeout is what
# notices a dead worker (and where a retry resumes from).
LONG_TIMEOUT = timedelta(hours=12)
LONG_HEARTBEAT = timedelta(seconds=20)
STOPPED = [ModelStatus.DELETED]
SEVERITY_ORDER = list(Severity)


def model_resource(ref: ModelRef) -> ResourceRef:
    return ResourceRef(
        kind=RESOURCE_KIND,
        id=str(ref.model_id),
        tenant_id=ref.tenant_id,
        project_id=ref.project_id,
    )


def failure_reason(err: BaseException) -> str:
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


def is_cancellation(err: BaseException) -> bool:
    return isinstance(err, asyncio.CancelledError) or (
        isinstance(err, ActivityError) and isinstance(err.cause, CancelledError)
    )


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"
        size /= 1024
    return f"{size:.1f} TiB"


class ModelWorkflow(TrackedWorkflow):
    async def _model_call(
        self,
        activity: str,
        payload: Any,
        result_type: type[T],
        *,
        start_to_close: timedelta = RESOLVE_TIMEOUT,
        heartbeat: timedelta | None = None,
        queue: Queue = Queue.MODEL,
    ) -> T:
        result: T = await workflow.execute_activity(
            activity,
            payload,
            task_queue=queue_for(queue),
            result_type=result_type,
            start_to_close_timeout=start_to_close,
            heartbeat_timeout=heartbeat,
            retry_policy=MODEL_RETRY,
        )
        return result

    async def _db_call(self, activity: str, payload: Any, result_type: type[T]) -> T:
        result: T = await workflow.execute_activity(
            activity,
            payload,
            task_queue=queue_for(Queue.ORCHESTRATION),
            result_type=result_type,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return result

    async def _set_status(self, ref: ModelRef, status: ModelStatus, reason: str) -> ModelStatus:
        return await self._db_call(
            "set_model_status",
            ModelStatusChange(
                model_id=ref.model_id, status=status, reason=reason, unless_in=STOPPED
            ),
            ModelStatus,
        )


ONBOARD_STEPS = ["resolve", "license", "download", "scan", "metadata", "finish"]


@workflow.defn(name="OnboardModel")
class OnboardModel(ModelWorkflow):
    def __init__(self) -> None:
        self._awaiting_review = False
        self._review: tuple[LicenseDecision, LicenseReview] | None = None
        self._download: DownloadProgressUpdate | None = None

    @workflow.signal(name=DOWNLOAD_PROGRESS_SIGNAL)
    def download_progress(self, update: DownloadProgressUpdate) -> None:
        self._download = update
        if self._tracker.step("download").status is StepStatus.RUNNING:
            percent = 100 * update.bytes_done / update.bytes_total if update.bytes_total else 0
            self._tracker.update(
                "download",
                percent=percent,
                detail=(
                    f"{update.files_done}/{update.files_total} files, "
                    f"{human_bytes(update.bytes_done)} of {human_bytes(update.bytes_total)}"
                ),
            )

    @workflow.update(name=APPROVE_LICENSE_UPDATE)
    async def approve_license(self, review: LicenseReview) -> str:
        self._review = (LicenseDecision.APPROVED, review)
        return "approved"

    @approve_license.validator
    def _check_approval(self, review: LicenseReview) -> None:
        self._check_review(review)

    @workflow.update(name=REJECT_LICENSE_UPDATE)
    async def reject_license(self, review: LicenseReview) -> str:
        self._review = (LicenseDecision.REJECTED, review)
        return "rejected"

    @reject_license.validator
    def _check_rejection(self, review: LicenseReview) -> None:
        self._check_review(review)

    def _check_review(self, review: LicenseReview) -> None:
        # Validators run before anything enters history: a refused review leaves no trace.
        if not self._awaiting_review or self._review is not None:
            raise ValueError("this model is not waiting for a license decision")
        if not review.actor_is_tenant_admin:
            raise ValueError("only a tenant admin may decide on a license")
        if not review.reason.strip():
            raise ValueError("a reason is required")

    @workflow.run
    async def run(self, request: OnboardModelRequest) -> OnboardModelResult:
        ref = request.model
        cloud = request.source_kind is SourceKind.CLOUD
        steps = ["resolve", "finish"] if cloud else ONBOARD_STEPS
        tracker = self.track(steps, model_resource(ref))
        step = "resolve"
        try:
            await self.record()
            tracker.start(step)
            resolved = await self._model_call("resolve_model", ref, ResolvedModel)
            tracker.finish(
                step,
                StepStatus.COMPLETED,
                f"{len(resolved.files)} files, {human_bytes(resolved.total_bytes)}"
                + (f" at {resolved.revision}" if resolved.revision else ""),
            )
            await self.record()
            if cloud:
                step = "finish"
                tracker.start(step)
                status = await self._set_status(ref, ModelStatus.READY, "cloud model")
                tracker.finish(step, StepStatus.COMPLETED, status.value)
                await self.record(RunStatus.COMPLETED)
                return OnboardModelResult(status=status)

            step = "license"
            tracker.start(step)
            verdict = await self._db_call(
                "decide_model_license",
                LicenseCheck(model=ref, license=resolved.license),
                LicenseVerdict,
            )
            await self._license_gate(ref, verdict, request.approval_timeout_days)

            step = "download"
            tracker.start(step, f"{len(resolved.files)} files")
            await self.record()
            download = await self._model_call(
                "download_model",
                DownloadRequest(model=ref, files=resolved.files),
                DownloadResult,
                start_to_close=LONG_TIMEOUT,
                heartbeat=LONG_HEARTBEAT,
            )
            tracker.finish(
                step,
                StepStatus.COMPLETED,
                f"{download.files} files, {human_bytes(download.bytes_total)} stored "
                f"({human_bytes(download.bytes_fetched)} fetched, "
                f"{download.files_reused} reused)",
            )

            step = "scan"
            tracker.start(step)
            await self.record()
            report = await self._model_call(
                "scan_model", ref, ScanReport, start_to_close=LONG_TIMEOUT, heartbeat=LONG_HEARTBEAT
            )
            tracker.finish(step, StepStatus.COMPLETED, describe_scan(report))

            step = "metadata"
            tracker.start(step)
            metadata = await self._model_call("extract_model_metadata", ref, ModelMetadataInfo)
            tracker.finish(step, StepStatus.COMPLETED, describe_metadata(metadata))

            step = "finish"
            tracker.start(step)
            if report.verdict is Verdict.CLEAN:
                status = await self._set_status(ref, ModelStatus.READY, "onboarded")
            else:
                status = await self._set_status(
                    ref, ModelStatus.QUARANTINED, f"security scan: {describe_scan(report)}"
                )
            tracker.finish(step, StepStatus.COMPLETED, status.value)
        except (ActivityError, ApplicationError, asyncio.CancelledError) as err:
            if is_cancellation(err):
                tracker.cancel_open()
                await self._discard(ref)
                await self._set_status(ref, ModelStatus.DELETED, "onboarding cancelled")
                await self.record(RunStatus.CANCELLED, error="cancelled")
                raise asyncio.CancelledError() from err
            reason = f"{step} failed: {failure_reason(err)}"
            tracker.finish(step, StepStatus.FAILED, failure_reason(err))
            tracker.cancel_open()
            await self._set_status(ref, ModelStatus.FAILED, reason)
            await self.record(RunStatus.FAILED, error=reason)
            raise ApplicationError(reason, type="OnboardingFailed", non_retryable=True) from err
        await self.record(RunStatus.COMPLETED)
        return OnboardModelResult(status=status)

    async def _license_gate(self, ref: ModelRef, verdict: LicenseVerdict, days: int) -> None:
        tracker = self._tracker
        if verdict.decision is LicenseDecision.DENY:
            raise ApplicationError(
                f"license {verdict.spdx_id} is denied by the tenant's policy",
                type="LicenseDenied",
                non_retryable=True,
            )
        if verdict.decision is LicenseDecision.ALLOW:
            tracker.finish("license", StepStatus.COMPLETED, f"{verdict.spdx_id}: allowed")
            return
        tracker.update(
            "license", detail=f"{verdict.spdx_id}: waiting for approve_license/reject_license"
        )
        await self._set_status(
            ref,
            ModelStatus.AWAITING_APPROVAL,
            f"license {verdict.spdx_id} needs a tenant admin's approval",
        )
        await self.record()
        self._awaiting_review = True
        try:
            await workflow.wait_condition(
                lambda: self._review is not None, timeout=timedelta(days=days)
            )
        except TimeoutError:
            raise ApplicationError(
                f"no license decision within {days} days", type="LicenseTimeout"
            ) from None
        assert self._review is not None
        decision, review = self._review
        await self._db_call(
            "record_license_review",
            LicenseOutcome(model_id=ref.model_id, decision=decision, review=review),
            bool,
        )
        who = review.actor_name or review.actor_id or "an operator"
        if decision is LicenseDecision.REJECTED:
            raise ApplicationError(
                f"license {verdict.spdx_id} rejected by {who}: {review.reason}",
                type="LicenseRejected",
                non_retryable=True,
            )
        tracker.finish("license", StepStatus.COMPLETED, f"{verdict.spdx_id}: approved by {who}")
        await self._set_status(ref, ModelStatus.ONBOARDING, f"license approved by {who}")

    async def _discard(self, ref: ModelRef) -> None:
        try:
            await self._model_call("discard_model_artifacts", ref, int)
        except ActivityError as err:
            workflow.logger.warning("could not discard artifacts: %s", failure_reason(err))


def describe_scan(report: ScanReport) -> str:
    if not report.findings:
        return f"clean ({report.files_scanned} files, {report.scanner} {report.version})"
    worst = max(report.findings, key=lambda f: SEVERITY_ORDER.index(f.severity))
    return (
        f"{report.verdict.value}: {len(report.findings)} findings, worst "
        f"{worst.severity.value} {worst.code} in {worst.file}"
    )


def describe_metadata(meta: ModelMetadataInfo) -> str:
    parts = [
        meta.architecture or meta.model_type or "unknown architecture",
        f"{meta.parameter_count:,} parameters" if meta.parameter_count else None,
        meta.dtype,
        f"context {meta.context_length}" if meta.context_length else None,
        meta.quantization,
    ]
    return ", ".join(p for p in parts if p)


@workflow.defn(name="RescanModels")
class RescanModels(ModelWorkflow):
    """Re-scan stored models: those scanned by an older scanner (the schedule), or the
    ones named (`POST /api/v1/models/{id}/rescan`). A verdict change moves the model
    between `ready` and `quarantined`."""

    @workflow.run
    async def run(self, request: RescanRequest) -> RescanResult:
        tracker = self.track(["select", "rescan"], ResourceRef(kind=RESOURCE_KIND))
        await self.record()
        tracker.start("select")
        plan = await self._db_call("models_to_rescan", request, RescanPlan)
        version, targets = plan.scanner_version, plan.targets
        tracker.finish("select", StepStatus.COMPLETED, f"{len(targets)} models, scanner {version}")
        tracker.start("rescan")
        quarantined = released = 0
        for done, target in enumerate(targets, start=1):
            ref = ModelRef(model_id=target.model_id, tenant_id=target.tenant_id)
            try:
                report = await self._model_call(
                    "scan_model",
                    ref,
                    ScanReport,
                    start_to_close=LONG_TIMEOUT,
                    heartbeat=LONG_HEARTBEAT,
                )
            except ActivityError as err:
                workflow.logger.warning(
                    "rescan of %s failed: %s", target.model_id, failure_reason(err)
                )
                continue
            change = await self._db_call("apply_scan_verdict", report_for(ref, report), str)
            quarantined += change == "quarantined"
            released += change == "released"
            tracker.update(
                "rescan", percent=100 * done / len(targets), detail=f"{done}/{len(targets)}"
            )
        tracker.finish(
            "rescan", StepStatus.COMPLETED, f"{quarantined} quarantined, {released} released"
        )
        await self.record(RunStatus.COMPLETED)
        return RescanResult(
            scanner_version=version,
            rescanned=len(targets),
            quarantined=quarantined,
            released=released,
        )


def report_for(ref: ModelRef, report: ScanReport) -> ModelStatusChange:
    """The status a fresh scan asks for (`apply_scan_verdict` applies it to ready or
    quarantined models only)."""
    if report.verdict is Verdict.CLEAN:
        return ModelStatusChange(model_id=ref.model_id, status=ModelStatus.READY, reason="rescan")
    return ModelStatusChange(
        model_id=ref.model_id,
        status=ModelStatus.QUARANTINED,
        reason=f"security scan: {describe_scan(report)}",
    )


@workflow.defn(name="SyncCloudModels")
class SyncCloudModels(ModelWorkflow):
    """Merge the bundled catalog with each tenant's providers' live model lists."""

    @workflow.run
    async def run(self, request: CatalogSyncRequest) -> CatalogSyncResult:
        tracker = self.track(["sync"], ResourceRef(kind="catalog"))
        await self.record()
        tracker.start("sync")
        tenants = (await self._db_call("catalog_tenants", request, TenantList)).tenant_ids
        total = CatalogSyncResult()
        for done, tenant in enumerate(tenants, start=1):
            result = await self._model_call(
                "sync_tenant_catalog",
                TenantList(tenant_ids=[tenant]),
                CatalogSyncResult,
                queue=Queue.SYNC,
            )
            total.tenants += 1
            total.added += result.added
            total.updated += result.updated
            total.deprecated += result.deprecated
            total.providers_checked = sorted(
                set(total.providers_checked) | set(result.providers_checked)
            )
            total.errors += result.errors
            tracker.update("sync", percent=100 * done / len(tenants), detail=f"{done} tenants")
        tracker.finish(
            "sync",
            StepStatus.COMPLETED,
            f"{total.added} added, {total.updated} updated, {total.deprecated} deprecated",
        )
        await self.record(RunStatus.COMPLETED)
        return total
