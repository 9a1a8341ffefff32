"""All model, artifact, scan, license, metadata, policy and catalog queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from control_plane.models.tables import (
    CatalogModel,
    LicensePolicy,
    Model,
    ModelArtifact,
    ModelLicense,
    ModelMetadata,
    ScanReport,
)
from workflows.contracts.models import ModelStatus

SORTABLE = {"name", "status", "source_kind", "created_at", "updated_at"}
CATALOG_SORTABLE = {"provider", "model_id", "modality", "status"}


class ModelRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, model_id: uuid.UUID, *, for_update: bool = False) -> Model | None:
        query = select(Model).where(Model.id == model_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.exec(query.execution_options(populate_existing=True))).first()

    def listing(
        self,
        tenant_id: uuid.UUID,
        projects: set[uuid.UUID] | None,
        *,
        project_id: uuid.UUID | None = None,
        status: ModelStatus | None = None,
        source_kind: str | None = None,
    ) -> SelectOfScalar[Model]:
        """`projects` None: every project of the tenant; else those plus shared models."""
        query = select(Model).where(Model.tenant_id == tenant_id)
        if projects is not None:
            query = query.where(
                col(Model.project_id).is_(None) | col(Model.project_id).in_(projects)
            )
        if project_id is not None:
            query = query.where(Model.project_id == project_id)
        if status is not None:
            query = query.where(Model.status == status.value)
        else:
            query = query.where(Model.status != ModelStatus.DELETED.value)
        if source_kind is not None:
            query = query.where(Model.source_kind == source_kind)
        return query

    async def name_taken(
        self, tenant_id: uuid.UUID, project_id: uuid.UUID | None, name: str
    ) -> bool:
        query = select(Model.id).where(
            Model.tenant_id == tenant_id,
            col(Model.project_id).is_not_distinct_from(project_id),
            Model.name == name,
            Model.status != ModelStatus.DELETED.value,
        )
        return (await self.session.exec(query)).first() is not None

    async def artifacts(self, model_id: uuid.UUID) -> Sequence[ModelArtifact]:
        query = select(ModelArtifact).where(ModelArtifact.model_id == model_id)
        return (await self.session.exec(query.order_by(col(ModelArtifact.path)))).all()

    async def reusable_artifact(
        self, model: Model, path: str, size: int, etag: str | None
    ) -> ModelArtifact | None:
        """The same file of the same pinned source, stored by an earlier onboarding."""
        if model.pinned_revision is None and etag is None:
            return None
        query = (
            select(ModelArtifact)
            .join(Model, col(Model.id) == col(ModelArtifact.model_id))
            .where(
                Model.source_kind == model.source_kind,
                Model.source_ref == model.source_ref,
                col(Model.pinned_revision).is_not_distinct_from(model.pinned_revision),
                ModelArtifact.path == path,
                ModelArtifact.size == size,
            )
        )
        if etag is not None:
            query = query.where(ModelArtifact.etag == etag)
        return (await self.session.exec(query.limit(1))).first()

    async def save_artifact(self, artifact: ModelArtifact) -> None:
        existing = (
            await self.session.exec(
                select(ModelArtifact).where(
                    ModelArtifact.model_id == artifact.model_id,
                    ModelArtifact.path == artifact.path,
                )
            )
        ).first()
        if existing is None:
            self.session.add(artifact)
        else:
            existing.size = artifact.size
            existing.sha256 = artifact.sha256
            existing.object_key = artifact.object_key
            existing.etag = artifact.etag
            self.session.add(existing)
        await self.session.flush()

    async def drop_artifacts(self, model_id: uuid.UUID) -> list[str]:
        """Delete the model's artifact rows; returns object keys no other model uses."""
        keys = {a.object_key for a in await self.artifacts(model_id)}
        await self.session.exec(
            delete(ModelArtifact).where(col(ModelArtifact.model_id) == model_id)
        )
        if not keys:
            return []
        shared = (
            await self.session.exec(
                select(ModelArtifact.object_key).where(col(ModelArtifact.object_key).in_(keys))
            )
        ).all()
        return sorted(keys - set(shared))

    async def object_in_use(self, key: str) -> bool:
        query = select(func.count()).where(ModelArtifact.object_key == key)
        return (await self.session.exec(query)).one() > 0

    async def latest_scan(self, model_id: uuid.UUID) -> ScanReport | None:
        query = (
            select(ScanReport)
            .where(ScanReport.model_id == model_id)
            .order_by(col(ScanReport.created_at).desc(), col(ScanReport.id).desc())
        )
        return (await self.session.exec(query.limit(1))).first()

    async def license(self, model_id: uuid.UUID) -> ModelLicense | None:
        query = select(ModelLicense).where(ModelLicense.model_id == model_id)
        return (await self.session.exec(query)).first()

    async def metadata(self, model_id: uuid.UUID) -> ModelMetadata | None:
        query = select(ModelMetadata).where(ModelMetadata.model_id == model_id)
        return (await self.session.exec(query)).first()

    async def rescan_candidates(
        self, version: str, model_ids: Sequence[uuid.UUID], *, force: bool
    ) -> Sequence[Model]:
        """Stored models (ready or quarantined) whose last scan is of another version."""
        query = select(Model).where(
            col(Model.status).in_([ModelStatus.READY.value, ModelStatus.QUARANTINED.value]),
            Model.source_kind != "cloud",
        )
        if model_ids:
            query = query.where(col(Model.id).in_(model_ids))
        models = (await self.session.exec(query.order_by(col(Model.created_at)))).all()
        if force:
            return models
        picked = []
        for model in models:
            scan = await self.latest_scan(model.id)
            if scan is None or scan.version != version:
                picked.append(model)
        return picked

    async def policy(self, tenant_id: uuid.UUID) -> LicensePolicy | None:
        query = select(LicensePolicy).where(LicensePolicy.tenant_id == tenant_id)
        return (await self.session.exec(query)).first()

    def catalog_listing(
        self,
        tenant_id: uuid.UUID,
        *,
        provider: str | None,
        modality: str | None,
        status: str | None,
    ) -> SelectOfScalar[CatalogModel]:
        query = select(CatalogModel).where(CatalogModel.tenant_id == tenant_id)
        if provider is not None:
            query = query.where(CatalogModel.provider == provider)
        if modality is not None:
            query = query.where(CatalogModel.modality == modality)
        if status is not None:
            query = query.where(CatalogModel.status == status)
        return query

    async def catalog(self, tenant_id: uuid.UUID) -> Sequence[CatalogModel]:
        return (
            await self.session.exec(select(CatalogModel).where(CatalogModel.tenant_id == tenant_id))
        ).all()

    async def catalog_entry(
        self, tenant_id: uuid.UUID, provider: str, model_id: str
    ) -> CatalogModel | None:
        query = select(CatalogModel).where(
            CatalogModel.tenant_id == tenant_id,
            CatalogModel.provider == provider,
            CatalogModel.model_id == model_id,
        )
        return (await self.session.exec(query)).first()
