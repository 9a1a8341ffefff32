"""Per-request usage records, kept off the request path.

The gateway calls `UsageRecorder.record` once per finished request: a synchronous append
to a bounded in-memory buffer, no I/O and no await. A background task writes the buffer
to PostgreSQL with one INSERT (an executemany) per batch, every `flush_seconds` or as
soon as `batch_size` entries wait, and `stop()` writes what is left.

While PostgreSQL is unreachable the entries stay in the buffer and the write is retried
with back-off; once the buffer is full the oldest entries are dropped, counted by
`cp_gateway_usage_dropped_total`, so memory stays bounded however long the outage lasts.
Nothing here ever raises into the gateway.

One recorder per process, used from its event loop only (`record` is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.core.db import session_scope, utcnow
from control_plane.core.logging import get_logger
from control_plane.usage.tables import MAX_NAME, UsageRecord

log = get_logger(__name__)

DEFAULT_BATCH_SIZE = 500
DEFAULT_FLUSH_SECONDS = 1.0
DEFAULT_MAX_BUFFER = 50_000
MAX_BACKOFF_SECONDS = 30.0
DEFAULT_STOP_SECONDS = 10.0
# PostgreSQL `integer`.
MAX_INT = 2**31 - 1
# Errors no retry can cure: the batch is dropped rather than retried forever.
REJECTED = (DataError, IntegrityError)


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEntry:
    """One finished gateway request, as the gateway knows it (plain values, no rows)."""

    tenant_id: uuid.UUID
    project_id: uuid.UUID
    api_key_id: uuid.UUID
    # The `model` the client asked for (a router or an endpoint name).
    route: str
    # The endpoint that answered (or last tried); "" when the request reached none.
    target: str = ""
    endpoint_id: uuid.UUID | None = None
    # The HTTP status the client got.
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # From the request's arrival to the end of its response.
    latency_ms: float
    # Streams: from the request's arrival to the first byte of the answer.
    ttft_ms: float | None = None
    stream: bool = False
    # When the request finished (timezone-aware UTC).
    finished_at: datetime = field(default_factory=utcnow)


def _name(value: str) -> str:
    # PostgreSQL text cannot hold NUL.
    return value.replace("\x00", "")[:MAX_NAME]


def _count(value: int) -> int:
    return min(max(value, 0), MAX_INT)


def _millis(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value >= 0 else None


Row = dict[str, Any]


def _row(entry: UsageEntry) -> Row:
    """The entry as a `usage_record` row, with whatever the column cannot hold cut down
    (done here, off the request path, so one odd entry never rejects a whole batch)."""
    return {
        "id": uuid.uuid4(),
        "created_at": entry.finished_at,
        "updated_at": entry.finished_at,
        "tenant_id": entry.tenant_id,
        "project_id": entry.project_id,
        "api_key_id": entry.api_key_id,
        "route": _name(entry.route),
        "target": _name(entry.target),
        "endpoint_id": entry.endpoint_id,
        "status": entry.status,
        "prompt_tokens": _count(entry.prompt_tokens),
        "completion_tokens": _count(entry.completion_tokens),
        "latency_ms": _millis(entry.latency_ms) or 0.0,
        "ttft_ms": _millis(entry.ttft_ms),
        "stream": entry.stream,
    }


def _reason(err: BaseException) -> str:
    # The driver's own message: SQLAlchemy's would repeat the statement and every row.
    return f"{type(err).__name__}: {getattr(err, 'orig', None) or err}"[:300]


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


# An executemany: asyncpg sends this one prepared statement with every row's values in a
# single pipelined round trip, about ten times faster than one multi-row VALUES statement
# (500 rows: ~13 ms against ~150 ms). A batch written again after a commit whose answer
# was lost keeps its ids, so nothing is inserted twice.
INSERT = insert(UsageRecord).on_conflict_do_nothing(index_elements=["id"])


class UsageRecorder:
    """Buffers usage entries and writes them to `usage_record` in batches.

    `flushes` counts the batches written (one INSERT each), `failures` the attempts that
    failed, `dropped` the entries lost (buffer full, or rejected by the database);
    `pending` is how many wait to be written.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        stop_seconds: float = DEFAULT_STOP_SECONDS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if batch_size < 1 or max_buffer < batch_size or flush_seconds <= 0:
            raise ValueError("need batch_size >= 1, max_buffer >= batch_size, flush_seconds > 0")
        self._sessions = sessions
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self.stop_seconds = stop_seconds
        # Entries as recorded, oldest first; before them, the rows of a batch that could
        # not be written (their ids already fixed).
        self._buffer: deque[UsageEntry | Row] = deque(maxlen=max_buffer)
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed_in_a_row = 0
        self.flushes = 0
        self.failures = 0
        self.dropped = 0
        self._dropped_metric = Counter(
            "cp_gateway_usage_dropped",
            "Usage records lost: `buffer_full` while the database was unreachable, "
            "`rejected` by the database.",
            ["reason"],
            registry=registry,
        )

    @property
    def pending(self) -> int:
        return len(self._buffer)

    # --- the request path ---------------------------------------------------------------

    def record(self, entry: UsageEntry) -> None:
        """Queue one entry: O(1), never blocks, never raises. A full buffer drops its
        oldest entry."""
        if len(self._buffer) == self.max_buffer:
            self._drop(1, "buffer_full")
        self._buffer.append(entry)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background writer (in the running event loop)."""
        if self._task is None:
            self._closing.clear()
            self._task = asyncio.create_task(self._run(), name="usage-recorder")

    async def stop(self) -> None:
        """Stop the writer and write what is left, within `stop_seconds`; what cannot be
        written by then is logged as lost."""
        self._closing.set()
        self._wake.set()
        task, self._task = self._task, None
        try:
            async with asyncio.timeout(self.stop_seconds):
                if task is not None:
                    # The batch being written finishes; the loop then returns.
                    await task
                await self.flush()
        except TimeoutError:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._buffer:
            log.warning("usage.recorder.unwritten_at_stop", entries=len(self._buffer))

    async def flush(self) -> None:
        """Write everything buffered now, batch by batch; stops at the first failure (the
        entries stay buffered)."""
        while self._buffer and await self._flush_one():
            pass

    # --- the writer -------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing.is_set():
            if self._failed_in_a_row:
                # Back off (new entries do not hurry a retry), but stop at once.
                await _wait(self._closing, self._backoff())
            else:
                await _wait(self._wake, self.flush_seconds)
            self._wake.clear()
            if self._closing.is_set():
                return
            await self.flush()

    def _backoff(self) -> float:
        return min(MAX_BACKOFF_SECONDS, self.flush_seconds * 2.0 ** (self._failed_in_a_row - 1))

    def _take(self) -> list[UsageEntry | Row]:
        count = min(self.batch_size, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    def _rows(self, batch: Sequence[UsageEntry | Row]) -> list[Row]:
        """The batch as rows. An entry that makes no row (a caller's bug) is dropped on
        its own rather than failing every retry of its batch."""
        rows: list[Row] = []
        for item in batch:
            if isinstance(item, dict):
                rows.append(item)
                continue
            try:
                rows.append(_row(item))
            except Exception as err:
                self._drop(1, "rejected")
                log.error("usage.recorder.entry_rejected", error=_reason(err))
        return rows

    def _put_back(self, rows: Sequence[Row]) -> None:
        """Return rows that could not be written to the front of the buffer; what no
        longer fits is their oldest part (entries recorded meanwhile are newer)."""
        room = self.max_buffer - len(self._buffer)
        if len(rows) > room:
            self._drop(len(rows) - room, "buffer_full")
            rows = rows[len(rows) - room :]
        self._buffer.extendleft(reversed(rows))

    def _drop(self, count: int, reason: str) -> None:
        self.dropped += count
        self._dropped_metric.labels(reason).inc(count)

    async def _flush_one(self) -> bool:
        """Write one batch; True if it was written (or rejected for good)."""
        rows = self._rows(self._take())
        if not rows:
            return True
        try:
            async with session_scope(self._sessions) as session:
                connection = await session.connection()
                await connection.execute(INSERT, rows)
        except asyncio.CancelledError:
            self._put_back(rows)
            raise
        except REJECTED as err:
            # Retrying would fail the same way and hold up every later entry.
            self.failures += 1
            self._drop(len(rows), "rejected")
            log.error("usage.recorder.batch_rejected", entries=len(rows), error=_reason(err))
            return True
        except Exception as err:
            self.failures += 1
            self._failed_in_a_row += 1
            self._put_back(rows)
            log.warning(
                "usage.recorder.flush_failed",
                entries=len(rows),
                pending=len(self._buffer),
                error=_reason(err),
            )
            return False
        self.flushes += 1
        if self._failed_in_a_row:
            log.info("usage.recorder.flush_recovered", pending=len(self._buffer))
        self._failed_in_a_row = 0
        return True
