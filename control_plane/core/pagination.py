"""One page of a list response, and the query that fetches it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    page: int
    limit: int


async def paginate(
    session: AsyncSession,
    query: SelectOfScalar[Any],
    table: type[Any],
    read: type[R],
    *,
    page: int,
    limit: int,
    sort: str,
    descending: bool,
    convert: Callable[[Any], R] | None = None,
) -> Page[R]:
    """Count, order by `sort` (then id, so pages are stable) and fetch one page.
    `convert` builds the read model from a row when `read.model_validate` cannot."""
    total = (await session.exec(select(func.count()).select_from(query.subquery()))).one()
    column = col(getattr(table, sort))
    rows = (
        await session.exec(
            query.order_by(column.desc() if descending else column.asc(), col(table.id))
            .offset((page - 1) * limit)
            .limit(limit)
        )
    ).all()
    return Page(
        items=[(convert or read.model_validate)(row) for row in rows],
        total=total,
        page=page,
        limit=limit,
    )
