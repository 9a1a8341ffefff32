"""Every query on routers and on what their targets and fallbacks name."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from control_plane.endpoints.tables import Endpoint
from control_plane.models.tables import Model
from control_plane.routing.schemas import RouterStatus
from control_plane.routing.tables import Router

SORTABLE = ("name", "strategy", "status", "created_at", "updated_at")


async def lock_key(session: AsyncSession, key: str) -> None:
    """A transaction-scoped advisory lock on `key`: held until commit or rollback."""
    await session.exec(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))


async def lock_name(session: AsyncSession, project_id: uuid.UUID, name: str) -> None:
    """Hold `name` in `project_id` until this transaction ends.

    Routers and endpoints share one namespace per project (the gateway's `model` names
    either), but each table's unique index only covers its own rows: whoever creates or
    renames either one takes this lock before checking both tables, so two concurrent
    requests cannot both find the name free.
    """
    await lock_key(session, f"cp-name:{project_id}:{name}")


class RouterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, router_id: uuid.UUID, *, for_update: bool = False) -> Router | None:
        query = select(Router).where(Router.id == router_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.exec(query.execution_options(populate_existing=True))).first()

    def listing(
        self,
        tenant_id: uuid.UUID,
        projects: Collection[uuid.UUID] | None,
        *,
        project_id: uuid.UUID | None = None,
        status: RouterStatus | None = None,
    ) -> SelectOfScalar[Router]:
        """`projects` None: every project of the tenant (tenant admins). No `status`: the
        live routers."""
        query = select(Router).where(Router.tenant_id == tenant_id)
        if projects is not None:
            query = query.where(col(Router.project_id).in_(projects))
        if project_id is not None:
            query = query.where(Router.project_id == project_id)
        query = query.where(Router.status == (status or RouterStatus.ACTIVE).value)
        return query

    async def page(
        self,
        query: SelectOfScalar[Router],
        *,
        page: int,
        limit: int,
        sort: str,
        descending: bool,
    ) -> tuple[Sequence[Router], int]:
        """One page ordered by `sort` (then id, so pages are stable), and the total."""
        assert sort in SORTABLE
        total = (await self.session.exec(select(func.count()).select_from(query.subquery()))).one()
        column = col(getattr(Router, sort))
        rows = (
            await self.session.exec(
                query.order_by(column.desc() if descending else column.asc(), col(Router.id))
                .offset((page - 1) * limit)
                .limit(limit)
            )
        ).all()
        return rows, total

    async def name_taken(
        self, project_id: uuid.UUID, name: str, *, other_than: uuid.UUID | None = None
    ) -> bool:
        query = select(Router.id).where(
            Router.project_id == project_id,
            Router.name == name,
            Router.status != RouterStatus.DELETED.value,
        )
        if other_than is not None:
            query = query.where(Router.id != other_than)
        return (await self.session.exec(query)).first() is not None

    async def fallback_graph(self, project_id: uuid.UUID) -> dict[uuid.UUID, list[uuid.UUID]]:
        """Live router -> the routers it falls back to, for the project."""
        query = select(Router.id, Router.fallbacks).where(
            Router.project_id == project_id, Router.status != RouterStatus.DELETED.value
        )
        return {
            router_id: [uuid.UUID(f["router_id"]) for f in fallbacks if f.get("router_id")]
            for router_id, fallbacks in (await self.session.exec(query)).all()
        }

    # --- what targets and fallbacks name --------------------------------------------

    async def routers(self, ids: Collection[uuid.UUID]) -> Sequence[Router]:
        if not ids:
            return []
        return (await self.session.exec(select(Router).where(col(Router.id).in_(ids)))).all()

    async def endpoints(self, ids: Collection[uuid.UUID]) -> Sequence[Endpoint]:
        if not ids:
            return []
        return (await self.session.exec(select(Endpoint).where(col(Endpoint.id).in_(ids)))).all()

    async def models(self, ids: Collection[uuid.UUID]) -> Sequence[Model]:
        if not ids:
            return []
        return (await self.session.exec(select(Model).where(col(Model.id).in_(ids)))).all()
