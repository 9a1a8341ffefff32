"""Every query on endpoints, their replicas and scaling events."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from control_plane.endpoints.tables import Endpoint, EndpointReplica, ScalingEvent
from workflows.contracts.endpoints import EndpointStatus, ReplicaInfo, ScalingEventRecord

SORTABLE = ("name", "status", "engine", "created_at", "updated_at")
# Endpoints that still hold (or may hold) replicas on a cluster or a model.
LIVE = [s.value for s in EndpointStatus if s not in (EndpointStatus.DELETED, EndpointStatus.FAILED)]


class EndpointRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, endpoint_id: uuid.UUID, *, for_update: bool = False) -> Endpoint | None:
        query = select(Endpoint).where(Endpoint.id == endpoint_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.exec(query)).first()

    def listing(
        self,
        tenant_id: uuid.UUID,
        projects: Sequence[uuid.UUID] | None,
        *,
        project_id: uuid.UUID | None = None,
        status: str | None = None,
        include_deleted: bool = False,
    ) -> SelectOfScalar[Endpoint]:
        """`projects` None: every project of the tenant (tenant admins)."""
        query = select(Endpoint).where(Endpoint.tenant_id == tenant_id)
        if projects is not None:
            query = query.where(col(Endpoint.project_id).in_(projects))
        if project_id is not None:
            query = query.where(Endpoint.project_id == project_id)
        if status is not None:
            query = query.where(Endpoint.status == status)
        elif not include_deleted:
            query = query.where(Endpoint.status != EndpointStatus.DELETED.value)
        return query

    async def name_taken(self, project_id: uuid.UUID, name: str) -> bool:
        query = select(Endpoint.id).where(
            Endpoint.project_id == project_id,
            Endpoint.name == name,
            Endpoint.status != EndpointStatus.DELETED.value,
        )
        return (await self.session.exec(query)).first() is not None

    async def live_on_cluster(self, cluster_id: uuid.UUID) -> Sequence[Endpoint]:
        query = select(Endpoint).where(
            Endpoint.cluster_id == cluster_id, col(Endpoint.status).in_(LIVE)
        )
        return (await self.session.exec(query)).all()

    async def live_for_model(self, model_id: uuid.UUID) -> Sequence[Endpoint]:
        query = select(Endpoint).where(
            Endpoint.model_id == model_id, col(Endpoint.status).in_(LIVE)
        )
        return (await self.session.exec(query)).all()

    async def replicas(self, endpoint_id: uuid.UUID) -> Sequence[EndpointReplica]:
        query = (
            select(EndpointReplica)
            .where(EndpointReplica.endpoint_id == endpoint_id)
            .order_by(col(EndpointReplica.name))
        )
        return (await self.session.exec(query)).all()

    async def replace_replicas(
        self,
        endpoint_id: uuid.UUID,
        replicas: Sequence[ReplicaInfo],
        loads: dict[str, float],
        observed_at: datetime,
    ) -> None:
        """Make the endpoint's replica rows say exactly what was observed."""
        await self.session.exec(
            delete(EndpointReplica).where(col(EndpointReplica.endpoint_id) == endpoint_id)
        )
        for info in replicas:
            self.session.add(
                EndpointReplica(
                    endpoint_id=endpoint_id,
                    name=info.name,
                    state=info.state.value,
                    url=info.url,
                    node=info.node,
                    pid=info.pid,
                    port=info.port,
                    started_at=info.started_at,
                    restarts=info.restarts,
                    reason=info.reason[:2000],
                    load=loads.get(info.name, 0.0),
                    observed_at=observed_at,
                )
            )

    def add_events(self, row: Endpoint, events: Sequence[ScalingEventRecord]) -> None:
        for event in events:
            self.session.add(
                ScalingEvent(
                    endpoint_id=row.id,
                    tenant_id=row.tenant_id,
                    project_id=row.project_id,
                    time=event.time,
                    from_replicas=event.from_replicas,
                    to_replicas=event.to_replicas,
                    reason=event.reason[:2000],
                    metric=event.metric,
                    trigger=event.trigger,
                )
            )

    async def events(self, endpoint_id: uuid.UUID, limit: int = 20) -> Sequence[ScalingEvent]:
        query = (
            select(ScalingEvent)
            .where(ScalingEvent.endpoint_id == endpoint_id)
            .order_by(col(ScalingEvent.time).desc(), col(ScalingEvent.id))
            .limit(limit)
        )
        return (await self.session.exec(query)).all()
