"""Cooldowns: targets that failed recently are left out of routing for a while.

State for one gateway process, one `Cooldowns` per router (its policy), kept with the
routing table. Synchronous and pure: every call takes `now`, a monotonic clock the
gateway reads once per request, so tests drive a fake one. Not thread-safe; one event
loop uses it, and no call awaits.

Rules, per target:

- Failures are counted in a sliding window of `window_s` seconds. `allowed_fails` of
  them are tolerated; the next one within the window starts a cooldown of `cooldown_s`.
- An upstream 429 (`rate_limited`) or any failure that carries a `Retry-After` starts a
  cooldown at once, for exactly the `Retry-After` (the upstream said when it will take
  requests again: sooner only earns another 429, later wastes capacity), capped at
  `MAX_COOLDOWN_S` against absurd headers. Without the header a 429 cools for
  `cooldown_s`.
- A failure during a cooldown extends it to `now + cooldown_s` (or its `Retry-After`),
  never shortening it: such failures come from requests that were already in flight or
  from a target that is being used anyway (below).
- A cooldown starting clears the failure count. When it ends the target is on
  probation, as a circuit breaker is half-open: its first failure cools it again at once;
  its first success ends the probation and it has `allowed_fails` again. Otherwise a
  target that is still broken would get `allowed_fails + 1` more requests each time it
  comes back.
- A success resets the failure count. A success during a cooldown changes nothing: it
  comes from a request sent before the cooldown started, which says nothing about now.
- The last available target is not cooled when there is no fallback: that rule is
  applied when routing, by `available(..., has_fallback=False)`, which returns every
  target rather than none when all of them are cooling. The state itself is the same
  whichever router asks, so a single-target router never locks itself out and the
  target still shows as cooling in `snapshot()` (it is unhealthy, only irreplaceable).

The gateway records a failure for what `RetryPolicy.is_retryable` accepts (the target's
fault: transport errors, 408, 429, 5xx) and not for the client's (400, 413, 422...)::

    live = cooldowns.available(router.targets, now, has_fallback=fallback_live)
    ...
    cooldowns.record_failure(target, now=now, rate_limited=status == 429,
                             retry_after_s=parsed_retry_after)
    cooldowns.record_success(target, now)

where `fallback_live` is whether some fallback target is itself available (its router's
`Cooldowns.any_available`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

# Longest cooldown a `Retry-After` can ask for.
MAX_COOLDOWN_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class CooldownPolicy:
    """Tolerate `allowed_fails` failures per `window_s` seconds; the next one cools the
    target for `cooldown_s` seconds."""

    allowed_fails: int = 3
    window_s: float = 60.0
    cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.allowed_fails, bool) or not isinstance(self.allowed_fails, int):
            raise ValueError(f"allowed_fails must be an integer, not {self.allowed_fails!r}")
        if self.allowed_fails < 0:
            raise ValueError(f"allowed_fails must be >= 0, not {self.allowed_fails}")
        # `not >` also refuses NaN.
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError(f"window_s must be a finite number > 0, not {self.window_s!r}")
        if not (self.cooldown_s > 0 and math.isfinite(self.cooldown_s)):
            raise ValueError(f"cooldown_s must be a finite number > 0, not {self.cooldown_s!r}")


@dataclass(frozen=True, slots=True)
class TargetCooldown:
    """One target's state for metrics: seconds of cooldown left (0 when not cooling),
    failures in the current window, and whether it is on probation."""

    remaining_s: float
    failures: int
    probation: bool

    @property
    def cooling(self) -> bool:
        return self.remaining_s > 0


class _State:
    __slots__ = ("failures", "probation", "until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.until = -math.inf
        self.probation = False


class Cooldowns:
    """Failure counts and cooldowns of one router's targets (see the module doc).

    Only targets with something to remember have an entry: a success or `snapshot`
    drops the others, so a healthy router costs one empty dict.
    """

    __slots__ = ("_states", "policy")

    def __init__(self, policy: CooldownPolicy) -> None:
        # Replaceable when the router's configuration changes; the state carries over.
        self.policy = policy
        self._states: dict[str, _State] = {}

    def record_failure(
        self,
        target: str,
        *,
        now: float,
        retry_after_s: float | None = None,
        rate_limited: bool = False,
    ) -> bool:
        """Count a failure of `target`; True when it started a cooldown (not when it
        extended one)."""
        policy = self.policy
        if retry_after_s is None:
            pause = policy.cooldown_s
        else:
            # `not >` also catches NaN: treat it as "retry now".
            pause = min(retry_after_s, MAX_COOLDOWN_S) if retry_after_s > 0 else 0.0
        state = self._states.get(target)
        if state is None:
            state = self._states[target] = _State()
        if now < state.until:
            state.until = max(state.until, now + pause)
            return False
        if not (rate_limited or retry_after_s is not None or state.probation):
            failures = state.failures
            horizon = now - policy.window_s
            while failures and failures[0] <= horizon:
                failures.popleft()
            failures.append(now)
            if len(failures) <= policy.allowed_fails:
                return False
        state.failures.clear()
        state.until = now + pause
        state.probation = True
        return True

    def record_success(self, target: str, now: float) -> None:
        """Reset `target`'s failure count and end its probation (not its cooldown)."""
        state = self._states.get(target)
        if state is not None and now >= state.until:
            del self._states[target]

    def is_cooling(self, target: str, now: float) -> bool:
        state = self._states.get(target)
        return state is not None and now < state.until

    def available(self, targets: Sequence[str], now: float, *, has_fallback: bool) -> list[str]:
        """The targets not cooling, in the order given.

        When every target is cooling and the request has nowhere else to go
        (`has_fallback` False), all of them: a cooling target may still answer, a
        refusal from the gateway certainly does not. With a fallback, an empty list
        sends the request there.
        """
        states = self._states
        if not states:
            return list(targets)
        live = [t for t in targets if (s := states.get(t)) is None or now >= s.until]
        if live or has_fallback:
            return live
        return list(targets)

    def any_available(self, targets: Iterable[str], now: float) -> bool:
        """Whether at least one of `targets` is not cooling."""
        return any(not self.is_cooling(t, now) for t in targets)

    def snapshot(self, now: float) -> dict[str, TargetCooldown]:
        """Targets with a cooldown, failures in the window or probation, for a gauge.

        Drops entries with nothing left to remember (their failures left the window).
        """
        window_s = self.policy.window_s
        result: dict[str, TargetCooldown] = {}
        for target, state in list(self._states.items()):
            failures = state.failures
            while failures and failures[0] <= now - window_s:
                failures.popleft()
            remaining_s = max(state.until - now, 0.0)
            if not (remaining_s or failures or state.probation):
                del self._states[target]
                continue
            result[target] = TargetCooldown(remaining_s, len(failures), state.probation)
        return result
