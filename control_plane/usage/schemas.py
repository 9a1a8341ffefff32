"""The query and the report of `GET /api/v1/usage`."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, model_validator

from control_plane.core.db import utcnow
from control_plane.identity.schemas import NO_NUL_PATTERN
from control_plane.usage.tables import MAX_NAME

DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=366)
MAX_GROUPS = 10_000

RouteName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NAME, pattern=NO_NUL_PATTERN)
]


# pydantic would also read a bare number as Unix time; the API takes ISO 8601 only.
_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_8601(value: object) -> object:
    if not isinstance(value, datetime) and not (
        isinstance(value, str) and _ISO_DATETIME.match(value)
    ):
        raise ValueError("must be an ISO 8601 date and time, such as 2026-01-31T00:00:00Z")
    return value


Moment = Annotated[datetime, BeforeValidator(_iso_8601)]


class UsageGroupBy(StrEnum):
    MODEL = "model"
    API_KEY = "api_key"
    TARGET = "target"
    DAY = "day"
    HOUR = "hour"


def _utc(value: datetime) -> datetime:
    # A time without an offset is read as UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UsageQuery(BaseModel):
    """Which requests to count and how to group them. Without `project_id`: every project
    the caller can see (the whole tenant for tenant admins, the key's project for an API
    key). The window is `[start, end)`: by default the 24 hours before `end`, `end`
    defaulting to now; at most 366 days."""

    project_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    route: RouteName | None = Field(
        default=None, description="Only requests for this `model` (router or endpoint name)"
    )
    start: Moment | None = Field(default=None, description="Inclusive; no offset means UTC")
    end: Moment | None = Field(default=None, description="Exclusive; no offset means UTC")
    group_by: UsageGroupBy = UsageGroupBy.MODEL
    limit: int = Field(
        default=1000,
        ge=1,
        le=MAX_GROUPS,
        description="Most groups returned (the largest by requests; time buckets: the "
        "earliest); `truncated` says when there were more",
    )

    @model_validator(mode="after")
    def _window(self) -> Self:
        try:
            end = _utc(self.end) if self.end is not None else None
            start = _utc(self.start) if self.start is not None else None
            if end is None:
                end = utcnow()
            if start is None:
                start = end - DEFAULT_WINDOW
        except OverflowError:
            raise ValueError("start and end must lie between the years 1 and 9999") from None
        if end <= start:
            raise ValueError("end must be after start")
        if end - start > MAX_WINDOW:
            raise ValueError(f"the window may span at most {MAX_WINDOW.days} days")
        self.start, self.end = start, end
        return self

    @property
    def window(self) -> tuple[datetime, datetime]:
        assert self.start is not None
        assert self.end is not None
        return self.start, self.end


class UsageTotals(BaseModel):
    requests: int
    errors: int = Field(description="Requests answered with a status of 400 or more")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms_p50: float | None = Field(description="Median latency; null without requests")
    latency_ms_p95: float | None
    ttft_ms_mean: float | None = Field(
        description="Mean time to first token of the streamed requests; null without any"
    )


class UsageGroup(UsageTotals):
    key: str = Field(
        description="The group: the `model` asked for, the API key id, the target endpoint "
        'name ("" for requests that reached none), or the UTC start of the day or hour'
    )


class UsageReport(BaseModel):
    project_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    route: str | None
    start: datetime
    end: datetime
    group_by: UsageGroupBy
    groups: list[UsageGroup]
    truncated: bool = Field(description="More groups matched than `limit`")
    total: UsageTotals = Field(description="Every matching request (all groups together)")
