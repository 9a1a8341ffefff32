"""Every query on usage records: aggregates over a time window (rows are written by the
recorder, never through a session here)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Result, Select, cast, func, select
from sqlalchemy.types import Float
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.usage.schemas import UsageGroupBy
from control_plane.usage.tables import UsageRecord

ERROR_STATUS = 400


@dataclass(frozen=True)
class UsageScope:
    """The rows a report covers. `projects` None: every project of the tenant."""

    tenant_id: uuid.UUID
    projects: Collection[uuid.UUID] | None
    start: datetime
    end: datetime
    api_key_id: uuid.UUID | None = None
    route: str | None = None


@dataclass(frozen=True)
class Aggregate:
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    ttft_ms_mean: float | None


def _measures() -> list[ColumnElement[Any]]:
    latency = col(UsageRecord.latency_ms)
    return [
        func.count().label("requests"),
        func.count().filter(col(UsageRecord.status) >= ERROR_STATUS).label("errors"),
        func.coalesce(func.sum(col(UsageRecord.prompt_tokens)), 0).label("prompt_tokens"),
        func.coalesce(func.sum(col(UsageRecord.completion_tokens)), 0).label("completion_tokens"),
        func.percentile_cont(0.5).within_group(latency).label("p50"),
        func.percentile_cont(0.95).within_group(latency).label("p95"),
        cast(func.avg(col(UsageRecord.ttft_ms)), Float).label("ttft"),
    ]


def _aggregate(row: Any) -> Aggregate:
    return Aggregate(
        requests=row.requests,
        errors=row.errors,
        prompt_tokens=int(row.prompt_tokens),
        completion_tokens=int(row.completion_tokens),
        latency_ms_p50=row.p50,
        latency_ms_p95=row.p95,
        ttft_ms_mean=row.ttft,
    )


def _group_key(group_by: UsageGroupBy) -> Any:
    if group_by is UsageGroupBy.MODEL:
        return col(UsageRecord.route)
    if group_by is UsageGroupBy.API_KEY:
        return col(UsageRecord.api_key_id)
    if group_by is UsageGroupBy.TARGET:
        return col(UsageRecord.target)
    # Buckets of UTC days and hours, whatever the session's time zone.
    return func.date_trunc(group_by.value, col(UsageRecord.created_at), "UTC")


class UsageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _run(self, query: Select[*tuple[Any, ...]]) -> Result[*tuple[Any, ...]]:
        # Core aggregates, no ORM rows: run on the session's connection (its transaction).
        connection = await self.session.connection()
        return await connection.execute(query)

    @staticmethod
    def _conditions(scope: UsageScope) -> list[ColumnElement[bool]]:
        conditions = [
            col(UsageRecord.tenant_id) == scope.tenant_id,
            col(UsageRecord.created_at) >= scope.start,
            col(UsageRecord.created_at) < scope.end,
        ]
        if scope.projects is not None:
            conditions.append(col(UsageRecord.project_id).in_(scope.projects))
        if scope.api_key_id is not None:
            conditions.append(col(UsageRecord.api_key_id) == scope.api_key_id)
        if scope.route is not None:
            conditions.append(col(UsageRecord.route) == scope.route)
        return conditions

    async def total(self, scope: UsageScope) -> Aggregate:
        query = select(*_measures()).where(*self._conditions(scope))
        return _aggregate((await self._run(query)).one())

    async def groups(
        self, scope: UsageScope, group_by: UsageGroupBy, *, limit: int
    ) -> Sequence[tuple[Any, Aggregate]]:
        """(key, aggregate) per group: time buckets earliest first, other groups the
        busiest first (then by key, so the order is stable); at most `limit`."""
        key = _group_key(group_by).label("key")
        query = select(key, *_measures()).where(*self._conditions(scope)).group_by(key)
        if group_by in (UsageGroupBy.DAY, UsageGroupBy.HOUR):
            query = query.order_by(key)
        else:
            query = query.order_by(func.count().desc(), key)
        rows = (await self._run(query.limit(limit))).all()
        return [(row.key, _aggregate(row)) for row in rows]
