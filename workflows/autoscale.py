"""The autoscaling policy as a pure function, called from the endpoint workflow on every
load sample. No I/O, clock or randomness: same inputs, same decision, so replays agree.

Rules, in order of precedence:

1. A manual pin wins, clamped to [0, max_replicas]: an operator may go below the
   minimum (pausing an endpoint to zero for maintenance) but never above the maximum,
   which is the budget the policy owner set.
2. Wake: at zero with load, go to max(1, min_replicas) at once; no window applies, the
   requests are already waiting. A windowed scale-up may take it higher still. At zero
   without load it stays there (with min_replicas == 0).
3. Scale to zero: min_replicas == 0 and no load for `scale_to_zero_after_s` (replicas
   still starting count as load: they have not served yet). This is its
   own, stricter idle timer, so it does not also wait out the down stabilization.
4. Scale up: to the lowest count wanted throughout the last `scale_up_window_s` (what the
   load justified continuously), at most `scale_up_max_step` above the current count.
5. Scale down: to the highest count wanted throughout the last
   `scale_down_stabilization_s`.
6. The result is clamped to [min_replicas, max_replicas], which also repairs a current
   count outside them (a policy just changed).

The desired count per sample is ceil(load / target) within [max(1, min), max]: while
merely idle the floor is one replica, reaching zero is rule 3's business alone.

Windows read the history as a step function: a desired count holds from its sample to
the next. A window the history does not reach back over (a fresh state) decides nothing,
so a new endpoint neither scales up nor down until it has seen a full window of load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from workflows.contracts.autoscale import (
    MAX_HISTORY,
    AutoscalePolicy,
    AutoscaleState,
    Decision,
    DesiredPoint,
    ScalingSample,
)

# Float division can land a hair above a whole number (1.1 / 0.1 == 11.000000000000002),
# which ceil would turn into one replica too many.
_EPSILON = 1e-9


def desired_replicas(policy: AutoscalePolicy, load: float) -> int:
    raw = math.ceil(load / policy.target_concurrency_per_replica - _EPSILON)
    return min(max(raw, 1, policy.min_replicas), policy.max_replicas)


def _window(history: Sequence[DesiredPoint], now: float, window_s: float) -> list[int] | None:
    """Desired counts in force during [now - window_s, now], or None when the history
    does not reach back to the window's start."""
    start = now - window_s
    in_force_at_start: int | None = None
    later: list[int] = []
    for point in history:
        if point.time <= start:
            in_force_at_start = point.desired
        else:
            later.append(point.desired)
    if in_force_at_start is None:
        return None
    return [in_force_at_start, *later]


def _record(
    history: Sequence[DesiredPoint], now: float, desired: int, horizon_s: float
) -> list[DesiredPoint]:
    points = list(history)
    # An unchanged count adds nothing to a step function: keeping only change points is
    # what keeps a long, steady window down to a single entry.
    if not points or points[-1].desired != desired:
        points.append(DesiredPoint(time=now, desired=desired))
    start = now - horizon_s
    # Keep the newest point at or before the horizon: it says what held when it began.
    first = 0
    for index, point in enumerate(points):
        if point.time <= start:
            first = index
    points = points[first:]
    # Safety valve only; losing the oldest point makes the up window uncovered (no scale
    # up for a moment), never an unjustified scale-up.
    return points[-MAX_HISTORY:]


def _fmt(value: float) -> str:
    return f"{value:g}"


def decide(
    policy: AutoscalePolicy,
    state: AutoscaleState,
    sample: ScalingSample,
    current_replicas: int,
    *,
    starting_is_load: bool = True,
) -> tuple[Decision, AutoscaleState]:
    """The replica count for this sample, and the state to pass to the next call.

    `starting_is_load` False gives the decisions of workflow histories recorded before
    replicas still starting counted as load (replays must decide as they did).

    `state` is not modified. `current_replicas` is what the endpoint runs now (what was
    last applied), not what is ready.
    """
    if current_replicas < 0:
        raise ValueError(f"current_replicas must be >= 0, got {current_replicas}")
    # Workflow time never goes back, but a sample replayed out of order must not make
    # the windows look into the future.
    now = sample.time
    if state.history:
        now = max(now, state.history[-1].time)

    load = sample.load
    # Replicas still starting (a wake, a scale-up) count as activity: their requests
    # wait at the gateway where no replica's metrics show them, and going back to zero
    # before they serve would turn a wake into a loop.
    starting = starting_is_load and sample.replicas_ready < current_replicas
    active = load > 0 or starting or state.starting
    last_active_at = state.last_active_at
    if active or last_active_at is None:
        last_active_at = now

    desired = desired_replicas(policy, load)
    history = _record(state.history, now, desired, policy.history_horizon_s)
    new_state = AutoscaleState(
        history=history,
        last_active_at=last_active_at,
        manual_replicas=state.manual_replicas,
        starting=starting,
    )

    current = current_replicas
    target_per = _fmt(policy.target_concurrency_per_replica)
    load_text = f"{_fmt(load)} requests in flight, target {target_per}/replica"
    if sample.replicas_ready != current:
        load_text += f", {sample.replicas_ready}/{current} ready"

    target, reason = _target(
        policy, new_state, now, load, desired, current, last_active_at, load_text
    )
    return (
        Decision(
            replicas=target,
            reason=reason,
            metric=load,
            desired=desired,
            changed=target != current,
        ),
        new_state,
    )


def _target(
    policy: AutoscalePolicy,
    state: AutoscaleState,
    now: float,
    load: float,
    desired: int,
    current: int,
    last_active_at: float,
    load_text: str,
) -> tuple[int, str]:
    if state.manual_replicas is not None:
        pinned = min(state.manual_replicas, policy.max_replicas)
        note = (
            f" (asked {state.manual_replicas}, max_replicas {policy.max_replicas})"
            if pinned != state.manual_replicas
            else ""
        )
        if pinned == current:
            return pinned, f"pinned at {pinned} by manual scale{note}"
        return pinned, f"manual scale {current} -> {pinned}{note}"

    if current == 0 and load == 0 and policy.min_replicas == 0:
        # The one-replica floor of `desired` is no reason to leave zero: only load is.
        return 0, "steady at 0: idle"

    up_window = _window(state.history, now, policy.scale_up_window_s)
    justified = min(up_window) if up_window is not None else None
    scaled_up = current
    if justified is not None and justified > current:
        scaled_up = min(justified, current + policy.scale_up_max_step)

    if current == 0 and load > 0:
        target = max(scaled_up, 1, policy.min_replicas)
        return target, f"wake 0 -> {target}: {load_text}"

    idle_s = now - last_active_at
    if (
        policy.min_replicas == 0
        and current > 0
        and load == 0
        and idle_s >= policy.scale_to_zero_after_s
    ):
        return 0, f"scale to zero {current} -> 0: idle for {_fmt(idle_s)}s"

    if current < policy.min_replicas:
        target = max(scaled_up, policy.min_replicas)
        return target, f"scale up {current} -> {target}: min_replicas is {policy.min_replicas}"
    if current > policy.max_replicas:
        target = policy.max_replicas
        return target, f"scale down {current} -> {target}: max_replicas is {target}"

    if scaled_up > current:
        note = ""
        if justified is not None and scaled_up < justified:
            note = f" (step limit {policy.scale_up_max_step}, wants {justified})"
        return scaled_up, f"scale up {current} -> {scaled_up}{note}: {load_text}"
    if desired > current:
        return current, (
            f"hold at {current}: {load_text} wants {desired}, waiting for it to persist "
            f"{_fmt(policy.scale_up_window_s)}s"
        )

    down_window = _window(state.history, now, policy.scale_down_stabilization_s)
    if desired < current:
        floor = max(down_window) if down_window is not None else current
        if floor < current:
            stab = _fmt(policy.scale_down_stabilization_s)
            return floor, (
                f"scale down {current} -> {floor}: at most {floor} wanted over the last "
                f"{stab}s; {load_text}"
            )
        return current, (
            f"hold at {current}: {load_text} wants {desired}, stabilizing for "
            f"{_fmt(policy.scale_down_stabilization_s)}s"
        )
    if policy.min_replicas == 0 and load == 0 and current > 0:
        return current, (
            f"steady at {current}: idle for {_fmt(idle_s)}s, scale to zero after "
            f"{_fmt(policy.scale_to_zero_after_s)}s"
        )
    return current, f"steady at {current}: {load_text}"
