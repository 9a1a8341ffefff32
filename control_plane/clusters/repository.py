"""All cluster queries, and the inventory upsert."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from control_plane.clusters.tables import (
    RELEASED_STATUSES,
    Accelerator,
    Cluster,
    ClusterEvent,
    ClusterNode,
)
from workflows.contracts.clusters import ClusterStatus, Inventory

SORTABLE = {"name", "kind", "status", "created_at", "updated_at"}


class ClusterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, row: Cluster) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def get(self, cluster_id: uuid.UUID, *, for_update: bool = False) -> Cluster | None:
        query = select(Cluster).where(Cluster.id == cluster_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.exec(query.execution_options(populate_existing=True))).first()

    def listing(
        self,
        tenant_id: uuid.UUID,
        *,
        status: ClusterStatus | None = None,
        kind: str | None = None,
        include_deleted: bool = False,
    ) -> SelectOfScalar[Cluster]:
        query = select(Cluster).where(Cluster.tenant_id == tenant_id)
        if status is not None:
            query = query.where(Cluster.status == status.value)
        elif not include_deleted:
            query = query.where(Cluster.status != ClusterStatus.DELETED.value)
        if kind is not None:
            query = query.where(Cluster.kind == kind)
        return query

    async def placeable(self, tenant_id: uuid.UUID) -> Sequence[Cluster]:
        query = select(Cluster).where(
            Cluster.tenant_id == tenant_id,
            col(Cluster.status).in_([ClusterStatus.AVAILABLE.value, ClusterStatus.DEGRADED.value]),
        )
        return (await self.session.exec(query)).all()

    async def any_cluster(self, tenant_id: uuid.UUID) -> bool:
        """Whether the tenant ever had a cluster (deleted ones count)."""
        query = select(Cluster.id).where(Cluster.tenant_id == tenant_id).limit(1)
        return (await self.session.exec(query)).first() is not None

    async def name_taken(self, tenant_id: uuid.UUID, name: str) -> bool:
        query = select(Cluster.id).where(
            Cluster.tenant_id == tenant_id,
            Cluster.name == name,
            Cluster.status != ClusterStatus.DELETED.value,
        )
        return (await self.session.exec(query)).first() is not None

    async def holding_server(self, tenant_id: uuid.UUID, server_url: str) -> Cluster | None:
        query = select(Cluster).where(
            Cluster.tenant_id == tenant_id,
            Cluster.server_url == server_url,
            col(Cluster.status).not_in(RELEASED_STATUSES),
        )
        return (await self.session.exec(query)).first()

    async def nodes(
        self, cluster_ids: Sequence[uuid.UUID], *, include_removed: bool = False
    ) -> Sequence[ClusterNode]:
        query = select(ClusterNode).where(col(ClusterNode.cluster_id).in_(cluster_ids))
        if not include_removed:
            query = query.where(ClusterNode.status != "removed")
        return (await self.session.exec(query.order_by(col(ClusterNode.name)))).all()

    async def accelerators(self, cluster_ids: Sequence[uuid.UUID]) -> Sequence[Accelerator]:
        query = select(Accelerator).where(col(Accelerator.cluster_id).in_(cluster_ids))
        return (await self.session.exec(query.order_by(col(Accelerator.model)))).all()

    async def history(self, cluster_id: uuid.UUID, *, limit: int = 50) -> Sequence[ClusterEvent]:
        query = (
            select(ClusterEvent)
            .where(ClusterEvent.cluster_id == cluster_id)
            .order_by(col(ClusterEvent.created_at).desc(), col(ClusterEvent.id).desc())
            .limit(limit)
        )
        return (await self.session.exec(query)).all()

    def set_status(self, row: Cluster, status: ClusterStatus, reason: str) -> bool:
        """Change the status (recording the change in the history); False if unchanged."""
        changed = row.status != status.value
        if changed:
            self.session.add(
                ClusterEvent(
                    cluster_id=row.id,
                    status=status.value,
                    previous_status=row.status,
                    reason=reason,
                )
            )
            row.status = status.value
        row.status_reason = reason
        self.session.add(row)
        return changed

    async def save_inventory(self, row: Cluster, inventory: Inventory, seen_at: datetime) -> None:
        """Upsert nodes and replace their accelerators; nodes gone from the cluster are
        marked `removed`; totals are rolled up onto the cluster row."""
        existing = {n.name: n for n in await self.nodes([row.id], include_removed=True)}
        seen: set[str] = set()
        for info in inventory.nodes:
            node = existing.get(info.name) or ClusterNode(
                cluster_id=row.id, name=info.name, status="ready"
            )
            node.status = "ready" if info.ready else "not_ready"
            node.reason = info.reason
            node.cpu_cores = info.cpu_cores
            node.allocatable_cpu = info.allocatable_cpu
            node.memory_mb = info.memory_mb
            node.allocatable_memory_mb = info.allocatable_memory_mb
            node.labels = dict(info.labels)
            node.last_seen_at = seen_at
            self.session.add(node)
            seen.add(info.name)
        await self.session.flush()
        nodes = {n.name: n for n in await self.nodes([row.id], include_removed=True)}
        await self.session.exec(delete(Accelerator).where(col(Accelerator.cluster_id) == row.id))
        for name, node in nodes.items():
            if name not in seen and node.status != "removed":
                node.status = "removed"
                node.reason = "no longer reported by the cluster"
                self.session.add(node)
        for info in inventory.nodes:
            for acc in info.accelerators:
                self.session.add(
                    Accelerator(
                        node_id=nodes[info.name].id,
                        cluster_id=row.id,
                        vendor=acc.vendor,
                        model=acc.model,
                        memory_mb=acc.memory_mb,
                        count=acc.count,
                        allocatable=acc.allocatable,
                        driver_version=acc.driver_version,
                        cuda_version=acc.cuda_version,
                    )
                )
        ready = [n for n in inventory.nodes if n.ready]
        row.node_count = len(inventory.nodes)
        row.ready_node_count = len(ready)
        row.cpu_cores = round(sum(n.cpu_cores for n in inventory.nodes), 3)
        row.allocatable_cpu = round(sum(n.allocatable_cpu for n in ready), 3)
        row.memory_mb = sum(n.memory_mb for n in inventory.nodes)
        row.allocatable_memory_mb = sum(n.allocatable_memory_mb for n in ready)
        row.gpu_count = sum(a.count for n in inventory.nodes for a in n.accelerators)
        row.allocatable_gpus = sum(a.allocatable for n in ready for a in n.accelerators)
        row.gpu_memory_mb = sum(
            a.memory_mb * a.count for n in inventory.nodes for a in n.accelerators
        )
        row.platform = inventory.connection.platform.value
        row.version = inventory.connection.version
        row.last_seen_at = seen_at
        self.session.add(row)
        await self.session.flush()
