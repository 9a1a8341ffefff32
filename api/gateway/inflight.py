"""Requests in flight per endpoint, shared by every gateway process through Redis.

`least_busy` must see the load the other gateway replicas put on a target, not only its
own. Asking Redis on every request would add a round trip to the hot path; instead each
process publishes its own counts every `period_s` into one hash (field
`<process>|<endpoint id>`, value `<count>|<unix ms>`) and reads everyone's back in the
same round trip. The request path reads the last snapshot (at most one period old).
A process that dies stops refreshing its fields: they are ignored after `stale_after_s`
and removed later, so a crash never leaves phantom load behind.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from redis.asyncio import Redis

from api.gateway.table import RoutingTable
from control_plane.core.logging import get_logger

log = get_logger(__name__)

KEY = "cp:gateway:inflight"


class SharedInflight:
    def __init__(
        self,
        redis: Redis,
        table: RoutingTable,
        *,
        period_s: float = 0.2,
        stale_after_s: float = 2.0,
        instance: str | None = None,
    ) -> None:
        self.redis = redis
        self.table = table
        self.period_s = period_s
        self.stale_after_s = stale_after_s
        self.instance = instance or uuid.uuid4().hex[:12]
        # Fields this process wrote last time (so a count that fell to 0 is removed), and
        # long-stale fields of processes that are gone.
        self._written: set[str] = set()
        self._dead: set[str] = set()

    async def run(self) -> None:
        while True:
            try:
                await self.exchange()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Redis down: keep the last snapshot, try again
                log.warning("gateway.inflight.exchange_failed", error=str(err))
            await asyncio.sleep(self.period_s)

    async def exchange(self) -> None:
        """Publish this process's counts and read everyone's, in one round trip."""
        now_ms = int(time.time() * 1000)
        mine = {
            f"{self.instance}|{endpoint_id}": f"{entry.in_flight}|{now_ms}"
            for endpoint_id, entry in self.table.endpoints.items()
            if entry.in_flight > 0
        }
        gone = (self._written - mine.keys()) | self._dead
        async with self.redis.pipeline(transaction=False) as pipe:
            if mine:
                pipe.hset(KEY, mapping=mine)  # type: ignore[arg-type]
            if gone:
                pipe.hdel(KEY, *gone)
            pipe.pexpire(KEY, int(self.stale_after_s * 10_000))
            pipe.hgetall(KEY)
            results = await pipe.execute()
        self._written = set(mine)
        self.apply(results[-1], now_ms)

    def apply(self, fields: dict[bytes, bytes], now_ms: int) -> None:
        stale_ms = self.stale_after_s * 1000
        remote: dict[str, int] = {}
        self._dead = set()
        for raw_field, raw_value in fields.items():
            instance, _, endpoint_id = raw_field.decode().partition("|")
            if instance == self.instance:
                continue
            count, _, stamp = raw_value.decode().partition("|")
            try:
                age = now_ms - int(stamp)
                if age > stale_ms:
                    if age > 5 * stale_ms:
                        self._dead.add(raw_field.decode())
                    continue
                remote[endpoint_id] = remote.get(endpoint_id, 0) + int(count)
            except ValueError:
                continue
        for key, entry in self.table.endpoints.items():
            entry.remote_in_flight = remote.get(str(key), 0)
