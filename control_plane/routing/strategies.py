"""Which target of a router gets a request first, which next, and when to try again.

On every request the gateway does, with no I/O in between::

    now = time.monotonic()
    live = cooldowns.available(router.targets, now, has_fallback=...)
    order = choose(router.strategy, [stats[t] for t in live], stream=body.stream,
                   rng=rng, latency=tracker, now=now)
    # try order[0]; on a retryable error (RetryPolicy.is_retryable) wait
    # RetryPolicy.delay(attempt, rng) and try the next one, then the router's fallbacks.

Everything here is synchronous and pure: the clock (`now`) and randomness (one
`random.Random`) are passed in, so tests are deterministic and the gateway pays no
syscalls. `choose` is O(n log n) for n candidates (one pass, one sort of n tuples; n is
1-20), draws n random numbers and allocates n tuples and two or three lists: 2-4 us
for 5 targets on CPython 3.11. A single candidate costs neither.

Strategies (`Strategy`):

- `weighted` (the default): a weighted random order. Each target draws an exponential
  variable of rate `weight` and the order is ascending draws. The first is target i with
  probability weight_i / sum of weights exactly (the minimum of independent exponentials),
  and the rest follow the same rule among those left: the same as drawing, removing and
  drawing again, in one pass.
- `least_busy`: fewest requests in flight per unit of weight (`in_flight / weight`)
  first. The gateway supplies `in_flight`: counted in this process or summed over the
  replicas in Redis; this module does not care which.
- `lowest_latency`: lowest EWMA first, from `LatencyTracker`: time to first token for a
  streaming request, total latency otherwise (the two differ by the whole generation).
- `usage_based`: lowest share of the target's TPM limit used in the current window first
  (`tpm_used`, supplied by the gateway).

Ties in every strategy (all idle, the same latency, no usage yet) are broken by the
same weighted draw as `weighted`, so a quiet router still splits by weight and never
sends everything to the first target listed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

Strategy = Literal["weighted", "least_busy", "lowest_latency", "usage_based"]
STRATEGIES: Final[tuple[Strategy, ...]] = get_args(Strategy)
DEFAULT_STRATEGY: Final[Strategy] = "weighted"

# What went wrong when no HTTP status came back: the connection could not be made, no
# answer arrived in time, or the upstream closed the connection before answering.
ErrorKind = Literal["connect", "timeout", "disconnect"]

# 408 is the upstream saying the request timed out on its side: the same as a timeout.
# 4xx statuses that describe the request itself (400, 401, 403, 404, 413, 422) fail the
# same way on every target, so retrying them only adds latency and cost.
RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(slots=True)
class TargetStats:
    """What `choose` knows about one target.

    `weight`, `tpm_limit` come from the router's configuration and are validated here;
    `in_flight` and `tpm_used` are measurements the gateway supplies (negative values, a
    counter that drifted, count as 0). The gateway can keep one instance per target with
    its routing table and update the measurements in place before each `choose`: they
    are plain attributes and nothing here keeps a reference.
    """

    target: str
    weight: float = 1.0
    in_flight: int = 0
    # Tokens used in the current TPM window, and the target's TPM limit (None: no limit).
    tpm_used: int = 0
    tpm_limit: int | None = None

    def __post_init__(self) -> None:
        # `not >` also refuses NaN.
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(
                f"weight of target {self.target!r} must be a finite number > 0, not {self.weight!r}"
            )
        if self.tpm_limit is not None and self.tpm_limit < 0:
            raise ValueError(f"tpm_limit of target {self.target!r} must be >= 0 or None")


class _Estimate:
    __slots__ = ("at", "value")

    def __init__(self, value: float, at: float) -> None:
        self.value = value
        self.at = at


class LatencyTracker:
    """EWMA of time to first token (streams) and of total latency (the rest) per target.

    One per gateway process; the estimates are local (each replica measures what it
    sends, which is a fair sample) and cost nothing to share.

    `alpha` is per sample: estimate += alpha * (sample - estimate); the first sample
    is taken as is. Per sample rather than a half-life in seconds because samples arrive
    with requests: a busy target's estimate follows it within a few responses and needs
    no exp() per observation, while time-based decay would still say nothing about a
    target nobody calls. The half-life in samples is ln(0.5) / ln(1 - alpha): 3.1 for
    the default 0.2, which follows a real change in a few responses without letting
    one long generation swing the order.

    That last case is what `stale_after_s` is for: a target is chosen only while it
    looks fastest, so a slow phase would otherwise stick to it forever. An estimate
    with no sample for `stale_after_s` seconds is forgotten: the target is explored
    again and its next sample starts a fresh estimate. None keeps estimates forever.

    Exploring: a target without an estimate (new, or forgotten) ranks as if it had the
    best estimate of the candidates, so it ties with the fastest and gets its share of
    the weighted tie-break until its first response is measured. Ranking it strictly
    first instead would send every request to a cold target until its first response
    came back.

    `tolerance` widens the tie: estimates within `best * (1 + tolerance)` count as the
    best, which spreads load over targets that are about as fast instead of herding it
    onto the one that measured a few milliseconds lower. 0 ranks strictly.
    """

    __slots__ = ("_latency", "_ttft", "alpha", "stale_after_s", "tolerance")

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        stale_after_s: float | None = 60.0,
        tolerance: float = 0.0,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha!r}")
        if stale_after_s is not None and not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0 or None, not {stale_after_s!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, not {tolerance!r}")
        self.alpha = alpha
        self.stale_after_s = math.inf if stale_after_s is None else stale_after_s
        self.tolerance = tolerance
        self._ttft: dict[str, _Estimate] = {}
        self._latency: dict[str, _Estimate] = {}

    def observe_ttft(self, target: str, seconds: float, *, now: float) -> None:
        """Time from forwarding a streaming request to its first token."""
        self._observe(self._ttft, target, seconds, now)

    def observe_latency(self, target: str, seconds: float, *, now: float) -> None:
        """Time from forwarding a non-streaming request to the end of its response."""
        self._observe(self._latency, target, seconds, now)

    def estimate(self, target: str, *, stream: bool, now: float) -> float | None:
        """The current EWMA for a streaming (TTFT) or other request; None to explore."""
        found = (self._ttft if stream else self._latency).get(target)
        if found is None or now - found.at > self.stale_after_s:
            return None
        return found.value

    def forget(self, target: str) -> None:
        """Drop a target that left the routing table."""
        self._ttft.pop(target, None)
        self._latency.pop(target, None)

    def _observe(
        self, table: dict[str, _Estimate], target: str, seconds: float, now: float
    ) -> None:
        # A NaN would poison the estimate for good.
        if not seconds >= 0:
            raise ValueError(f"a latency sample must be >= 0 seconds, not {seconds!r}")
        found = table.get(target)
        if found is None:
            table[target] = _Estimate(seconds, now)
        elif now - found.at > self.stale_after_s:
            found.value = seconds
            found.at = now
        else:
            found.value += self.alpha * (seconds - found.value)
            found.at = now


def choose(
    strategy: Strategy,
    candidates: Sequence[TargetStats],
    *,
    stream: bool,
    rng: random.Random,
    latency: LatencyTracker | None = None,
    now: float | None = None,
) -> list[str]:
    """Target ids in the order to try them: the primary first (see the module doc).

    `candidates` are the targets that may be tried (cooling ones already left out);
    an empty sequence gives an empty list. `lowest_latency` needs `latency` and `now`
    (the clock its samples were recorded with); the other strategies ignore both.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown routing strategy {strategy!r}")
    if strategy == "lowest_latency" and (latency is None or now is None):
        raise ValueError("the lowest_latency strategy needs a LatencyTracker and now")
    if len(candidates) < 2:
        return [c.target for c in candidates]

    rand = rng.random
    log = math.log
    # -log(1 - U) / w is an exponential draw of rate w (1 - U is in (0, 1], log is finite).
    if strategy == "weighted":
        drawn = sorted([(-log(1.0 - rand()) / c.weight, c.target) for c in candidates])
        return [target for _, target in drawn]

    keys: list[float]
    if strategy == "least_busy":
        keys = [c.in_flight / c.weight if c.in_flight > 0 else 0.0 for c in candidates]
    elif strategy == "usage_based":
        keys = _usage_keys(candidates)
    else:
        # Checked above; the asserts only tell mypy.
        assert latency is not None
        assert now is not None
        keys = _latency_keys(candidates, latency, stream, now)
    ranked = sorted(
        [
            (key, -log(1.0 - rand()) / c.weight, c.target)
            for key, c in zip(keys, candidates, strict=True)
        ]
    )
    return [target for _, _, target in ranked]


def _usage_keys(candidates: Sequence[TargetStats]) -> list[float]:
    """Share of the TPM limit used. A target without a limit counts as having the largest
    limit of the set (it can take at least that much), so shares stay comparable; when no
    target has one the shares are absolute tokens. A limit of 0 ranks last."""
    default = max((c.tpm_limit for c in candidates if c.tpm_limit is not None), default=0) or 1
    keys: list[float] = []
    for c in candidates:
        capacity = default if c.tpm_limit is None else c.tpm_limit
        used = c.tpm_used if c.tpm_used > 0 else 0
        keys.append(used / capacity if capacity else math.inf)
    return keys


def _latency_keys(
    candidates: Sequence[TargetStats], tracker: LatencyTracker, stream: bool, now: float
) -> list[float]:
    table = tracker._ttft if stream else tracker._latency
    stale_after_s = tracker.stale_after_s
    estimates: list[float | None] = []
    best = math.inf
    for c in candidates:
        found = table.get(c.target)
        if found is None or now - found.at > stale_after_s:
            estimates.append(None)
        else:
            estimates.append(found.value)
            best = min(best, found.value)
    if best == math.inf:
        best = 0.0
    tied = best * (1.0 + tracker.tolerance)
    return [best if e is None or e <= tied else e for e in estimates]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many more attempts a request gets after the first, and when.

    An attempt goes to the next target of `choose`'s order, then to the router's
    fallbacks. Nothing is retried once the first byte of the response went to the client
    (`response_started`): the client would get two responses spliced together.

    Back-off is exponential with "equal jitter": the n-th retry waits between half and
    all of `min(max_delay_s, base_delay_s * 2 ** (n - 1))`. The guaranteed half keeps
    retries spaced when many requests fail at once; the random half keeps them from
    arriving in lockstep.
    """

    retries: int = 2
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    retry_on: frozenset[int] = RETRYABLE_STATUSES

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise ValueError(f"retries must be an integer, not {self.retries!r}")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if not (0 <= self.base_delay_s <= self.max_delay_s < math.inf):
            raise ValueError("delays must satisfy 0 <= base_delay_s <= max_delay_s (finite)")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (1 for the first retry)."""
        if attempt < 1:
            raise ValueError("attempt must be >= 1 (the first retry)")
        # Past 2**64 the cap has long applied; the bound keeps the float finite.
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt - 1, 64))
        return ceiling / 2 + rng.random() * ceiling / 2

    def is_retryable(
        self,
        status: int | None,
        error: ErrorKind | None = None,
        *,
        response_started: bool = False,
    ) -> bool:
        """Whether another attempt may help: an upstream `status` in `retry_on`, or with
        no status a transport `error` (any kind: the upstream never answered, another
        target may). Never once the response has started reaching the client."""
        if response_started:
            return False
        if status is not None:
            return status in self.retry_on
        return error is not None
