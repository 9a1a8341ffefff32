"""Endpoint autoscaling policy: pure decisions over explicit times (no clock, no sleeping)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from workflows.autoscale import decide, desired_replicas
from workflows.contracts.autoscale import (
    MAX_HISTORY,
    AutoscalePolicy,
    AutoscaleState,
    Decision,
    ScalingSample,
)


def policy(**overrides: Any) -> AutoscalePolicy:
    values: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_concurrency_per_replica": 4.0,
        "scale_up_window_s": 0.0,
        "scale_up_max_step": 4,
        "scale_down_stabilization_s": 60.0,
        "scale_to_zero_after_s": 300.0,
    }
    values.update(overrides)
    return AutoscalePolicy.model_validate(values)


class Endpoint:
    """Feeds samples to `decide` and applies each decision, as the workflow will."""

    def __init__(self, pol: AutoscalePolicy, replicas: int = 1) -> None:
        self.policy = pol
        self.replicas = replicas
        self.state = AutoscaleState()
        self.last: Decision | None = None

    def at(self, time: float, load: float) -> Decision:
        sample = ScalingSample(time=time, running=load, waiting=0, replicas_ready=self.replicas)
        decision, self.state = decide(self.policy, self.state, sample, self.replicas)
        self.replicas = decision.replicas
        self.last = decision
        return decision

    def every(self, start: float, stop: float, step: float, load: float) -> list[int]:
        """Samples at start, start+step, ... < stop; the replica count after each."""
        counts: list[int] = []
        time = start
        while time < stop:
            counts.append(self.at(time, load).replicas)
            time += step
        return counts


class TestValidation:
    def test_defaults_are_sensible(self) -> None:
        p = AutoscalePolicy()
        assert (p.min_replicas, p.max_replicas) == (1, 1)
        assert p.target_concurrency_per_replica == 4.0
        assert p.scale_up_window_s == 0.0
        assert p.scale_up_max_step == 4
        assert p.scale_down_stabilization_s == 60.0
        assert p.scale_to_zero_after_s == 300.0

    def test_min_above_max_is_refused_with_both_numbers(self) -> None:
        with pytest.raises(ValidationError, match=r"min_replicas \(3\) must not exceed max_rep"):
            AutoscalePolicy(min_replicas=3, max_replicas=2)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("min_replicas", -1),
            ("max_replicas", 0),
            ("target_concurrency_per_replica", 0),
            ("target_concurrency_per_replica", -2.5),
            ("target_concurrency_per_replica", float("inf")),
            ("scale_up_window_s", -1),
            ("scale_up_max_step", 0),
            ("scale_down_stabilization_s", -0.5),
            ("scale_to_zero_after_s", 0),
            ("scale_to_zero_after_s", float("nan")),
            ("max_replicas", True),
            ("target_concurrency_per_replica", True),
            ("max_replicas", 2.5),
        ],
    )
    def test_bad_values_are_refused(self, field: str, value: object) -> None:
        with pytest.raises(ValidationError) as error:
            AutoscalePolicy.model_validate({"max_replicas": 5, field: value})
        assert field in str(error.value)

    def test_unknown_keys_are_refused(self) -> None:
        with pytest.raises(ValidationError, match="max_replica"):
            AutoscalePolicy.model_validate({"max_replica": 3})

    def test_min_may_equal_max_and_zero_min_is_allowed(self) -> None:
        assert AutoscalePolicy(min_replicas=2, max_replicas=2).min_replicas == 2
        assert AutoscalePolicy(min_replicas=0, max_replicas=3).min_replicas == 0

    def test_negative_load_and_current_replicas_are_refused(self) -> None:
        with pytest.raises(ValidationError):
            ScalingSample(time=0, running=-1)
        with pytest.raises(ValueError, match="current_replicas"):
            decide(policy(), AutoscaleState(), ScalingSample(time=0), -1)


class TestDesired:
    @pytest.mark.parametrize(
        ("load", "expected"),
        [(0, 1), (0.5, 1), (4, 1), (4.01, 2), (14, 4), (16, 4), (17, 5), (1000, 10)],
    )
    def test_ceil_of_load_over_target_within_bounds(self, load: float, expected: int) -> None:
        assert desired_replicas(policy(), load) == expected

    def test_float_noise_does_not_add_a_replica(self) -> None:
        assert desired_replicas(policy(target_concurrency_per_replica=0.1), 1.1) == 10

    def test_min_raises_the_floor(self) -> None:
        assert desired_replicas(policy(min_replicas=3), 1) == 3


class TestSteadyState:
    def test_matching_load_changes_nothing(self) -> None:
        endpoint = Endpoint(policy(), replicas=2)
        for t in range(0, 600, 10):
            decision = endpoint.at(float(t), 7)
            assert decision.replicas == 2
            assert not decision.changed
        assert endpoint.last is not None
        assert endpoint.last.reason.startswith("steady at 2: 7 requests in flight")
        assert endpoint.last.metric == 7

    def test_metric_is_running_plus_waiting(self) -> None:
        sample = ScalingSample(time=0, running=9, waiting=5, replicas_ready=2)
        decision, _ = decide(policy(), AutoscaleState(), sample, 2)
        assert decision.metric == 14
        assert decision.desired == 4

    def test_reason_mentions_replicas_not_yet_ready(self) -> None:
        sample = ScalingSample(time=0, running=8, replicas_ready=1)
        decision, _ = decide(policy(), AutoscaleState(), sample, 2)
        assert decision.reason == "steady at 2: 8 requests in flight, target 4/replica, 1/2 ready"

    def test_input_state_is_not_modified(self) -> None:
        state = AutoscaleState()
        decide(policy(), state, ScalingSample(time=0, running=20), 1)
        assert state == AutoscaleState()


class TestScaleUp:
    def test_immediate_with_zero_window(self) -> None:
        endpoint = Endpoint(policy(), replicas=2)
        decision = endpoint.at(0, 14)
        assert (decision.replicas, decision.changed) == (4, True)
        assert decision.reason == "scale up 2 -> 4: 14 requests in flight, target 4/replica"

    def test_windowed_waits_for_the_load_to_persist(self) -> None:
        endpoint = Endpoint(policy(scale_up_window_s=30), replicas=1)
        endpoint.every(-100, 0, 10, load=2)
        assert endpoint.every(0, 30, 10, load=14) == [1, 1, 1]
        assert endpoint.last is not None
        assert "waiting for it to persist 30s" in endpoint.last.reason
        assert endpoint.at(30, 14).replicas == 4

    def test_a_dip_restarts_the_window(self) -> None:
        endpoint = Endpoint(policy(scale_up_window_s=30), replicas=1)
        endpoint.every(-100, 0, 10, load=2)
        assert endpoint.every(0, 20, 10, load=14) == [1, 1]
        assert endpoint.at(20, 1).replicas == 1
        assert endpoint.every(30, 60, 10, load=14) == [1, 1, 1]
        assert endpoint.at(60, 14).replicas == 4

    def test_goes_to_what_was_justified_throughout_the_window(self) -> None:
        endpoint = Endpoint(policy(scale_up_window_s=30, scale_up_max_step=10), replicas=1)
        endpoint.every(-100, 0, 10, load=2)
        endpoint.every(0, 20, 10, load=10)  # wants 3
        endpoint.every(20, 30, 10, load=30)  # wants 8, but only for 10s so far
        assert endpoint.at(30, 30).replicas == 3
        assert endpoint.at(50, 30).replicas == 8

    def test_a_fresh_state_does_not_scale_up_before_a_full_window(self) -> None:
        endpoint = Endpoint(policy(scale_up_window_s=30), replicas=1)
        assert endpoint.every(0, 30, 10, load=40) == [1, 1, 1]
        assert endpoint.at(30, 40).replicas == 5


class TestStepLimit:
    def test_at_most_step_added_per_decision(self) -> None:
        endpoint = Endpoint(policy(max_replicas=20, scale_up_max_step=3), replicas=1)
        assert endpoint.every(0, 40, 10, load=40) == [4, 7, 10, 10]
        assert endpoint.last is not None

    def test_reason_names_the_limit(self) -> None:
        endpoint = Endpoint(policy(max_replicas=20, scale_up_max_step=2), replicas=2)
        decision = endpoint.at(0, 36)
        assert decision.replicas == 4
        assert decision.reason.startswith("scale up 2 -> 4 (step limit 2, wants 9):")


class TestClampToMax:
    def test_never_above_max(self) -> None:
        endpoint = Endpoint(policy(max_replicas=3), replicas=1)
        assert endpoint.at(0, 1000).replicas == 3
        assert endpoint.at(10, 1000).replicas == 3
        assert endpoint.at(10, 1000).desired == 3

    def test_current_above_a_lowered_max_comes_down_at_once(self) -> None:
        endpoint = Endpoint(policy(max_replicas=3), replicas=6)
        decision = endpoint.at(0, 1000)
        assert decision.replicas == 3
        assert decision.reason == "scale down 6 -> 3: max_replicas is 3"

    def test_current_below_a_raised_min_goes_up_at_once(self) -> None:
        endpoint = Endpoint(policy(min_replicas=2, scale_up_window_s=60), replicas=1)
        decision = endpoint.at(0, 0)
        assert decision.replicas == 2
        assert decision.reason == "scale up 1 -> 2: min_replicas is 2"


class TestStabilization:
    def test_scale_down_happens_exactly_after_the_window(self) -> None:
        endpoint = Endpoint(policy(), replicas=1)
        endpoint.every(0, 100, 10, load=16)  # 4 replicas
        assert endpoint.replicas == 4
        # Need drops at t=100: held through t=150, down at t=160 (60s later).
        assert endpoint.every(100, 160, 10, load=3) == [4] * 6
        assert endpoint.last is not None
        assert "stabilizing for 60s" in endpoint.last.reason
        decision = endpoint.at(160, 3)
        assert (decision.replicas, decision.changed) == (1, True)
        assert decision.reason.startswith("scale down 4 -> 1: at most 1 wanted over the last 60s")

    def test_goes_down_to_the_highest_need_in_the_window(self) -> None:
        endpoint = Endpoint(policy(), replicas=1)
        endpoint.every(0, 100, 10, load=32)  # 8
        endpoint.every(100, 130, 10, load=12)  # 3
        endpoint.every(130, 160, 10, load=4)  # 1
        assert endpoint.replicas == 8
        assert endpoint.at(160, 4).replicas == 3
        assert endpoint.at(190, 4).replicas == 1

    def test_flapping_load_does_not_flap_replicas(self) -> None:
        endpoint = Endpoint(policy(), replicas=1)
        counts = []
        for i in range(60):
            counts.append(endpoint.at(i * 10.0, 16 if i % 2 == 0 else 1).replicas)
        assert set(counts) == {4}

    def test_zero_stabilization_scales_down_at_once(self) -> None:
        endpoint = Endpoint(policy(scale_down_stabilization_s=0), replicas=4)
        assert endpoint.at(0, 16).replicas == 4
        assert endpoint.at(10, 4).replicas == 1

    def test_a_fresh_state_does_not_scale_down_before_a_full_window(self) -> None:
        endpoint = Endpoint(policy(), replicas=5)
        assert endpoint.every(0, 60, 10, load=0) == [5] * 6
        assert endpoint.at(60, 0).replicas == 1


class TestScaleToZero:
    def test_after_idle_for_the_configured_time(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0), replicas=1)
        endpoint.at(0, 3)
        counts = endpoint.every(10, 300, 10, load=0)
        assert set(counts) == {1}
        assert endpoint.last is not None
        assert "scale to zero after 300s" in endpoint.last.reason
        decision = endpoint.at(300, 0)
        assert (decision.replicas, decision.changed) == (0, True)
        assert decision.reason == "scale to zero 1 -> 0: idle for 300s"
        assert endpoint.at(310, 0).replicas == 0
        assert endpoint.last is not None
        assert endpoint.last.reason == "steady at 0: idle"

    def test_any_load_resets_the_idle_timer(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0), replicas=1)
        endpoint.at(0, 1)
        endpoint.every(10, 200, 10, load=0)
        endpoint.at(200, 0.5)
        assert set(endpoint.every(210, 500, 10, load=0)) == {1}
        assert endpoint.at(500, 0).replicas == 0

    def test_never_active_counts_as_idle_from_the_first_sample(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0), replicas=1)
        assert set(endpoint.every(1000, 1300, 10, load=0)) == {1}
        assert endpoint.at(1300, 0).replicas == 0

    def test_does_not_wait_for_stabilization_when_idle_timer_is_shorter(self) -> None:
        endpoint = Endpoint(
            policy(min_replicas=0, scale_to_zero_after_s=30, scale_down_stabilization_s=600),
            replicas=1,
        )
        endpoint.every(0, 100, 10, load=16)
        assert endpoint.replicas == 4
        # Idle counts from the last sample with load (t=90).
        assert endpoint.every(100, 120, 10, load=0) == [4, 4]
        assert endpoint.at(120, 0).replicas == 0

    def test_not_with_a_nonzero_min(self) -> None:
        endpoint = Endpoint(policy(min_replicas=1, scale_to_zero_after_s=10), replicas=1)
        assert set(endpoint.every(0, 1000, 10, load=0)) == {1}


class TestWakeFromZero:
    def test_load_at_zero_wakes_at_once_even_with_an_up_window(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0, scale_up_window_s=120), replicas=0)
        endpoint.every(0, 100, 10, load=0)
        decision = endpoint.at(100, 40)
        assert (decision.replicas, decision.changed) == (1, True)
        assert decision.reason == "wake 0 -> 1: 40 requests in flight, target 4/replica"

    def test_zero_window_wakes_straight_to_the_need_within_the_step(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0), replicas=0)
        assert endpoint.at(0, 40).replicas == 4
        assert endpoint.at(10, 40).replicas == 8

    def test_stays_at_zero_without_load(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0), replicas=0)
        assert set(endpoint.every(0, 100, 10, load=0)) == {0}

    def test_woken_endpoint_does_not_drop_back_before_idle_again(self) -> None:
        endpoint = Endpoint(policy(min_replicas=0, scale_to_zero_after_s=60), replicas=0)
        endpoint.at(0, 2)
        assert endpoint.replicas == 1
        assert set(endpoint.every(10, 60, 10, load=0)) == {1}
        assert endpoint.at(60, 0).replicas == 0


class TestManualPin:
    def test_pin_overrides_load_and_clear_resumes(self) -> None:
        endpoint = Endpoint(policy(), replicas=2)
        endpoint.state = endpoint.state.pinned(6)
        decision = endpoint.at(0, 0)
        assert (decision.replicas, decision.reason) == (6, "manual scale 2 -> 6")
        assert set(endpoint.every(10, 300, 10, load=100)) == {6}
        assert endpoint.last is not None
        assert endpoint.last.reason == "pinned at 6 by manual scale"
        endpoint.state = endpoint.state.pinned(None)
        assert endpoint.at(300, 100).replicas == 10

    def test_pin_may_go_below_min_and_to_zero(self) -> None:
        endpoint = Endpoint(policy(min_replicas=2), replicas=3)
        endpoint.state = endpoint.state.pinned(0)
        assert endpoint.at(0, 50).replicas == 0

    def test_pin_is_clamped_to_max(self) -> None:
        endpoint = Endpoint(policy(max_replicas=4), replicas=1)
        endpoint.state = endpoint.state.pinned(9)
        decision = endpoint.at(0, 0)
        assert decision.replicas == 4
        assert decision.reason == "manual scale 1 -> 4 (asked 9, max_replicas 4)"

    def test_history_keeps_recording_while_pinned(self) -> None:
        endpoint = Endpoint(policy(scale_up_window_s=30), replicas=1)
        endpoint.state = endpoint.state.pinned(1)
        endpoint.every(0, 100, 10, load=40)
        endpoint.state = endpoint.state.pinned(None)
        # The window is already covered by what was seen during the pin.
        assert endpoint.at(100, 40).replicas == 5

    def test_negative_pin_is_refused(self) -> None:
        with pytest.raises(ValidationError):
            AutoscaleState().pinned(-1)


class TestContinueAsNew:
    def test_state_round_trips_and_decisions_continue(self) -> None:
        endpoint = Endpoint(policy(), replicas=1)
        endpoint.every(0, 100, 10, load=16)
        endpoint.every(100, 130, 10, load=3)
        endpoint.state = endpoint.state.pinned(None)

        dumped = endpoint.state.model_dump(mode="json")
        restored = AutoscaleState.model_validate(dumped)
        assert restored == endpoint.state
        assert AutoscaleState.model_validate_json(endpoint.state.model_dump_json()) == restored

        resumed = Endpoint(endpoint.policy, replicas=endpoint.replicas)
        resumed.state = restored
        # Same stabilization deadline as if the run had never ended.
        assert resumed.every(130, 160, 10, load=3) == [4, 4, 4]
        assert resumed.at(160, 3).replicas == 1

    def test_manual_pin_survives(self) -> None:
        state = AutoscaleState().pinned(3)
        assert AutoscaleState.model_validate(state.model_dump()).manual_replicas == 3


class TestBoundedHistory:
    def test_steady_load_keeps_a_single_point(self) -> None:
        endpoint = Endpoint(policy(), replicas=1)
        endpoint.every(0, 100_000, 10, load=8)
        assert len(endpoint.state.history) == 1

    def test_points_older_than_the_longest_window_are_dropped(self) -> None:
        endpoint = Endpoint(policy(scale_up_window_s=30, scale_down_stabilization_s=60))
        for i in range(1000):
            endpoint.at(i * 10.0, float(i % 7) * 4)
        now = 9990.0
        times = [p.time for p in endpoint.state.history]
        # Only what the 60s window needs, plus the point in force at its start.
        assert times[0] <= now - 60 < times[1]
        assert len(times) <= 60 // 10 + 1

    def test_hard_cap_on_change_points(self) -> None:
        endpoint = Endpoint(policy(scale_down_stabilization_s=86_400, max_replicas=50))
        for i in range(2000):
            endpoint.at(float(i), float(i % 2) * 100)
        assert len(endpoint.state.history) == MAX_HISTORY

    def test_time_going_back_does_not_break_the_windows(self) -> None:
        endpoint = Endpoint(policy(), replicas=1)
        endpoint.at(100, 16)
        endpoint.at(50, 0)
        assert [p.time for p in endpoint.state.history] == [100, 100]


def test_replicas_still_starting_hold_off_scale_to_zero() -> None:
    """After a wake the requests wait at the gateway, invisible to the replicas' metrics:
    the endpoint must not go back to zero before its replica serves."""
    policy = AutoscalePolicy(min_replicas=0, max_replicas=2, scale_to_zero_after_s=10)
    state = AutoscaleState()
    for second in range(0, 60, 5):
        starting = ScalingSample(time=float(second), running=0, waiting=0, replicas_ready=0)
        decision, state = decide(policy, state, starting, 1)
        assert decision.replicas == 1, decision.reason
    # The idle timer starts at the first sample that finds the replica ready, however
    # long after the last one that found it starting.
    ready = ScalingSample(time=75.0, running=0, waiting=0, replicas_ready=1)
    decision, state = decide(policy, state, ready, 1)
    assert decision.replicas == 1
    later = ScalingSample(time=80.0, running=0, waiting=0, replicas_ready=1)
    decision, state = decide(policy, state, later, 1)
    assert decision.replicas == 1
    decision, _ = decide(policy, state, later.model_copy(update={"time": 85.0}), 1)
    assert decision.replicas == 0
    # Histories recorded before this rule decide as they did.
    _, old = decide(policy, AutoscaleState(), starting, 1, starting_is_load=False)
    decision, _ = decide(
        policy,
        old,
        ScalingSample(time=80.0, running=0, waiting=0, replicas_ready=0),
        1,
        starting_is_load=False,
    )
    assert decision.replicas == 0
