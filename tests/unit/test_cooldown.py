"""Cooldowns driven by explicit clock values (seconds on a fake monotonic clock)."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.routing.cooldown import (
    MAX_COOLDOWN_S,
    CooldownPolicy,
    Cooldowns,
    TargetCooldown,
)


def cooldowns(allowed_fails: int = 2, window_s: float = 10, cooldown_s: float = 30) -> Cooldowns:
    return Cooldowns(CooldownPolicy(allowed_fails, window_s, cooldown_s))


def fail(state: Cooldowns, target: str, *times: float) -> list[bool]:
    return [state.record_failure(target, now=t) for t in times]


class TestCooldownPolicy:
    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"allowed_fails": -1}, "allowed_fails must be >= 0"),
            ({"allowed_fails": 1.5}, "allowed_fails must be an integer"),
            ({"allowed_fails": True}, "allowed_fails must be an integer"),
            ({"window_s": 0}, "window_s must be a finite number > 0"),
            ({"window_s": float("nan")}, "window_s must be a finite number > 0"),
            ({"cooldown_s": -5}, "cooldown_s must be a finite number > 0"),
            ({"cooldown_s": float("inf")}, "cooldown_s must be a finite number > 0"),
        ],
    )
    def test_rejects_nonsense(self, fields: dict[str, Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            CooldownPolicy(**fields)

    def test_zero_allowed_fails_is_valid(self) -> None:
        assert CooldownPolicy(allowed_fails=0).allowed_fails == 0


class TestFailuresInTheWindow:
    def test_the_failure_after_the_allowed_ones_starts_a_cooldown(self) -> None:
        state = cooldowns(allowed_fails=2, window_s=10, cooldown_s=30)
        assert fail(state, "a", 0, 1, 2) == [False, False, True]
        assert state.is_cooling("a", 2)
        assert state.is_cooling("a", 31.9)
        assert not state.is_cooling("b", 2)

    def test_failures_spread_wider_than_the_window_do_not(self) -> None:
        state = cooldowns(allowed_fails=2, window_s=10)
        assert fail(state, "a", 0, 6, 12, 18, 24) == [False] * 5
        assert not state.is_cooling("a", 24)

    def test_zero_allowed_fails_cools_on_the_first(self) -> None:
        state = cooldowns(allowed_fails=0)
        assert fail(state, "a", 5) == [True]
        assert state.is_cooling("a", 5)

    def test_a_success_resets_the_count(self) -> None:
        state = cooldowns(allowed_fails=2)
        fail(state, "a", 0, 1)
        state.record_success("a", 2)
        assert fail(state, "a", 3, 4) == [False, False]
        assert not state.is_cooling("a", 4)

    def test_targets_are_counted_apart(self) -> None:
        state = cooldowns(allowed_fails=1)
        fail(state, "a", 0)
        fail(state, "b", 1)
        assert not state.is_cooling("a", 1)
        assert not state.is_cooling("b", 1)


class TestRateLimited:
    def test_a_429_cools_at_once_for_its_retry_after(self) -> None:
        state = cooldowns(allowed_fails=5, cooldown_s=30)
        assert state.record_failure("a", now=100, rate_limited=True, retry_after_s=7)
        assert state.is_cooling("a", 106.9)
        assert not state.is_cooling("a", 107)

    def test_a_429_without_retry_after_cools_for_the_policy(self) -> None:
        state = cooldowns(allowed_fails=5, cooldown_s=30)
        assert state.record_failure("a", now=0, rate_limited=True)
        assert state.is_cooling("a", 29.9)
        assert not state.is_cooling("a", 30)

    def test_any_retry_after_cools_at_once(self) -> None:
        state = cooldowns(allowed_fails=5)
        assert state.record_failure("a", now=0, retry_after_s=3)  # e.g. a 503
        assert state.is_cooling("a", 2)

    def test_an_absurd_retry_after_is_capped(self) -> None:
        state = cooldowns()
        state.record_failure("a", now=0, rate_limited=True, retry_after_s=10**9)
        assert state.is_cooling("a", MAX_COOLDOWN_S - 1)
        assert not state.is_cooling("a", MAX_COOLDOWN_S)

    @pytest.mark.parametrize("retry_after_s", [0.0, -4.0, float("nan")])
    def test_a_retry_after_of_nothing_means_now(self, retry_after_s: float) -> None:
        state = cooldowns()
        state.record_failure("a", now=0, rate_limited=True, retry_after_s=retry_after_s)
        assert not state.is_cooling("a", 0)


class TestDuringACooldown:
    def test_another_failure_extends_it(self) -> None:
        state = cooldowns(allowed_fails=0, cooldown_s=30)
        fail(state, "a", 0)
        assert fail(state, "a", 20) == [False]
        assert state.is_cooling("a", 49.9)
        assert not state.is_cooling("a", 50)

    def test_a_shorter_failure_never_shortens_it(self) -> None:
        state = cooldowns(allowed_fails=0, cooldown_s=5)
        state.record_failure("a", now=0, rate_limited=True, retry_after_s=60)
        state.record_failure("a", now=1)
        assert state.is_cooling("a", 59)

    def test_a_success_does_not_end_it(self) -> None:
        state = cooldowns(allowed_fails=0, cooldown_s=30)
        fail(state, "a", 0)
        state.record_success("a", 10)
        assert state.is_cooling("a", 10)

    def test_the_target_is_available_again_after_it(self) -> None:
        state = cooldowns(allowed_fails=0, cooldown_s=30)
        fail(state, "a", 0)
        assert state.available(["a", "b"], 29, has_fallback=False) == ["b"]
        assert state.available(["a", "b"], 30, has_fallback=False) == ["a", "b"]


class TestProbation:
    def test_the_first_failure_after_a_cooldown_cools_again_at_once(self) -> None:
        state = cooldowns(allowed_fails=3, cooldown_s=30)
        fail(state, "a", 0, 1, 2, 3)
        assert fail(state, "a", 40) == [True]
        assert state.is_cooling("a", 69)

    def test_a_success_after_it_gives_back_the_allowed_fails(self) -> None:
        state = cooldowns(allowed_fails=3, window_s=100, cooldown_s=30)
        fail(state, "a", 0, 1, 2, 3)
        state.record_success("a", 40)
        assert fail(state, "a", 41, 42, 43) == [False] * 3
        assert fail(state, "a", 44) == [True]


class TestLastAvailableTarget:
    def test_a_single_target_without_fallback_is_never_left_out(self) -> None:
        state = cooldowns(allowed_fails=0)
        state.record_failure("only", now=0, rate_limited=True, retry_after_s=60)
        assert state.available(["only"], 1, has_fallback=False) == ["only"]
        # It is unhealthy, only irreplaceable: the state still says so.
        assert state.is_cooling("only", 1)

    def test_when_every_target_cools_without_fallback_all_are_kept(self) -> None:
        state = cooldowns(allowed_fails=0)
        fail(state, "a", 0)
        fail(state, "b", 1)
        assert state.available(["a", "b"], 2, has_fallback=False) == ["a", "b"]

    def test_with_a_fallback_cooling_targets_are_left_out(self) -> None:
        state = cooldowns(allowed_fails=0)
        fail(state, "only", 0)
        assert state.available(["only"], 1, has_fallback=True) == []

    def test_while_one_is_available_only_that_one_is_offered(self) -> None:
        state = cooldowns(allowed_fails=0)
        fail(state, "a", 0)
        assert state.available(["a", "b", "c"], 1, has_fallback=False) == ["b", "c"]

    def test_any_available_tells_whether_a_fallback_can_take_it(self) -> None:
        state = cooldowns(allowed_fails=0)
        fail(state, "f1", 0)
        assert state.any_available(["f1", "f2"], 1)
        fail(state, "f2", 0)
        assert not state.any_available(["f1", "f2"], 1)


class TestSnapshot:
    def test_reports_cooldowns_failures_and_probation(self) -> None:
        state = cooldowns(allowed_fails=2, window_s=10, cooldown_s=30)
        fail(state, "cool", 0, 1, 2)
        fail(state, "shaky", 5)
        snapshot = state.snapshot(12)
        assert snapshot == {
            "cool": TargetCooldown(remaining_s=20, failures=0, probation=True),
            "shaky": TargetCooldown(remaining_s=0, failures=1, probation=False),
        }
        assert snapshot["cool"].cooling
        assert not snapshot["shaky"].cooling

    def test_forgets_what_left_the_window(self) -> None:
        state = cooldowns(allowed_fails=2, window_s=10)
        fail(state, "a", 0)
        assert state.snapshot(11) == {}
        assert state.snapshot(11) == {}

    def test_a_healthy_router_holds_no_state(self) -> None:
        state = cooldowns()
        fail(state, "a", 0)
        state.record_success("a", 1)
        state.record_success("b", 1)
        assert state.snapshot(1) == {}

    def test_a_new_policy_applies_to_the_state_kept(self) -> None:
        state = cooldowns(allowed_fails=5)
        fail(state, "a", 0, 1)
        state.policy = CooldownPolicy(allowed_fails=1, window_s=10, cooldown_s=30)
        assert fail(state, "a", 2) == [True]
