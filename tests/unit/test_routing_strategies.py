"""Routing strategies and retry policy: pure functions driven by a seeded `random.Random`
and explicit clock values, so every run draws the same numbers."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from control_plane.routing.strategies import (
    DEFAULT_STRATEGY,
    RETRYABLE_STATUSES,
    STRATEGIES,
    LatencyTracker,
    RetryPolicy,
    Strategy,
    TargetStats,
    choose,
)


def first_picks(
    strategy: Strategy,
    candidates: list[TargetStats],
    *,
    n: int,
    seed: int = 7,
    stream: bool = False,
    latency: LatencyTracker | None = None,
    now: float | None = None,
) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(
        choose(strategy, candidates, stream=stream, rng=rng, latency=latency, now=now)[0]
        for _ in range(n)
    )


class TestTargetStats:
    @pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
    def test_refuses_a_weight_that_is_not_positive_and_finite(self, weight: float) -> None:
        with pytest.raises(ValueError, match="weight of target 'a' must be a finite number > 0"):
            TargetStats("a", weight=weight)

    def test_refuses_a_negative_tpm_limit(self) -> None:
        with pytest.raises(ValueError, match="tpm_limit"):
            TargetStats("a", tpm_limit=-1)

    def test_defaults_to_weight_one_idle_and_unlimited(self) -> None:
        stats = TargetStats("a")
        assert (stats.weight, stats.in_flight, stats.tpm_used, stats.tpm_limit) == (1, 0, 0, None)


class TestChoose:
    def test_weighted_is_the_default(self) -> None:
        assert DEFAULT_STRATEGY == "weighted"
        assert set(STRATEGIES) == {"weighted", "least_busy", "lowest_latency", "usage_based"}

    @pytest.mark.parametrize("strategy", ["weighted", "least_busy", "usage_based"])
    def test_orders_every_candidate_once(self, strategy: Strategy) -> None:
        candidates = [
            TargetStats(name, weight=w) for name, w in zip("abcde", [1, 2, 3, 4, 5], strict=True)
        ]
        order = choose(strategy, candidates, stream=False, rng=random.Random(1))
        assert sorted(order) == list("abcde")

    def test_no_candidates_gives_nothing_and_one_gives_itself(self) -> None:
        rng = random.Random(1)
        assert choose("weighted", [], stream=False, rng=rng) == []
        assert choose("least_busy", [TargetStats("a")], stream=True, rng=rng) == ["a"]

    def test_refuses_an_unknown_strategy(self) -> None:
        bogus: Any = "round_robin"
        with pytest.raises(ValueError, match="unknown routing strategy 'round_robin'"):
            choose(bogus, [TargetStats("a")], stream=False, rng=random.Random(1))

    def test_lowest_latency_needs_a_tracker_and_a_clock(self) -> None:
        with pytest.raises(ValueError, match="LatencyTracker and now"):
            choose("lowest_latency", [TargetStats("a")], stream=False, rng=random.Random(1))
        with pytest.raises(ValueError, match="LatencyTracker and now"):
            choose(
                "lowest_latency",
                [TargetStats("a")],
                stream=False,
                rng=random.Random(1),
                latency=LatencyTracker(),
            )


class TestWeighted:
    @pytest.mark.parametrize("seed", range(10))
    def test_splits_one_to_three_within_five_points_over_2000_requests(self, seed: int) -> None:
        picks = first_picks(
            "weighted", [TargetStats("a", weight=1), TargetStats("b", weight=3)], n=2000, seed=seed
        )
        assert abs(picks["a"] / 2000 - 0.25) <= 0.05
        assert abs(picks["b"] / 2000 - 0.75) <= 0.05

    def test_fractional_weights_split_in_proportion(self) -> None:
        candidates = [TargetStats("a", weight=0.5), TargetStats("b", 0.3), TargetStats("c", 0.2)]
        picks = first_picks("weighted", candidates, n=2000)
        for target, share in {"a": 0.5, "b": 0.3, "c": 0.2}.items():
            assert abs(picks[target] / 2000 - share) <= 0.05

    def test_the_second_place_is_weighted_among_the_rest(self) -> None:
        candidates = [TargetStats("a", weight=8), TargetStats("b", 1), TargetStats("c", 3)]
        rng = random.Random(3)
        seconds = Counter(
            order[1]
            for order in (
                choose("weighted", candidates, stream=False, rng=rng) for _ in range(4000)
            )
            if order[0] == "a"
        )
        # Without replacement: after "a", "c" comes second three times as often as "b".
        ratio = seconds["c"] / seconds["b"]
        assert 2.4 < ratio < 3.6

    def test_the_same_seed_gives_the_same_orders(self) -> None:
        candidates = [TargetStats(name) for name in "abcd"]
        runs = [
            [choose("weighted", candidates, stream=False, rng=rng) for _ in range(20)]
            for rng in (random.Random(42), random.Random(42))
        ]
        assert runs[0] == runs[1]


class TestLeastBusy:
    def test_prefers_the_idle_target(self) -> None:
        candidates = [TargetStats("busy", in_flight=4), TargetStats("idle", in_flight=0)]
        assert first_picks("least_busy", candidates, n=200) == {"idle": 200}

    def test_orders_by_in_flight_per_unit_of_weight(self) -> None:
        candidates = [
            TargetStats("a", weight=1, in_flight=2),  # 2.0
            TargetStats("b", weight=4, in_flight=4),  # 1.0
            TargetStats("c", weight=2, in_flight=3),  # 1.5
        ]
        assert choose("least_busy", candidates, stream=False, rng=random.Random(1)) == [
            "b",
            "c",
            "a",
        ]

    def test_ties_spread_over_both(self) -> None:
        candidates = [TargetStats("a", in_flight=2), TargetStats("b", in_flight=2)]
        picks = first_picks("least_busy", candidates, n=2000)
        assert abs(picks["a"] / 2000 - 0.5) <= 0.05

    def test_ties_follow_the_weights(self) -> None:
        candidates = [TargetStats("a", weight=1), TargetStats("b", weight=3)]
        picks = first_picks("least_busy", candidates, n=2000)
        assert abs(picks["b"] / 2000 - 0.75) <= 0.05

    def test_a_drifted_negative_count_counts_as_idle(self) -> None:
        candidates = [TargetStats("a", in_flight=-3), TargetStats("b", in_flight=0)]
        picks = first_picks("least_busy", candidates, n=2000)
        assert abs(picks["a"] / 2000 - 0.5) <= 0.05


class TestLatencyTracker:
    def test_the_first_sample_is_the_estimate_then_it_moves_by_alpha(self) -> None:
        tracker = LatencyTracker(alpha=0.5)
        tracker.observe_latency("a", 2.0, now=0)
        assert tracker.estimate("a", stream=False, now=0) == 2.0
        tracker.observe_latency("a", 4.0, now=1)
        assert tracker.estimate("a", stream=False, now=1) == 3.0

    def test_ttft_and_latency_are_separate(self) -> None:
        tracker = LatencyTracker()
        tracker.observe_ttft("a", 0.2, now=0)
        assert tracker.estimate("a", stream=True, now=0) == 0.2
        assert tracker.estimate("a", stream=False, now=0) is None

    def test_an_estimate_without_samples_for_too_long_is_forgotten(self) -> None:
        tracker = LatencyTracker(alpha=0.1, stale_after_s=30)
        tracker.observe_latency("a", 5.0, now=0)
        assert tracker.estimate("a", stream=False, now=30) == 5.0
        assert tracker.estimate("a", stream=False, now=31) is None
        # The next sample starts afresh instead of moving a stale value by alpha.
        tracker.observe_latency("a", 1.0, now=31)
        assert tracker.estimate("a", stream=False, now=31) == 1.0

    def test_forget_drops_both_estimates(self) -> None:
        tracker = LatencyTracker()
        tracker.observe_latency("a", 1.0, now=0)
        tracker.observe_ttft("a", 1.0, now=0)
        tracker.forget("a")
        assert tracker.estimate("a", stream=False, now=0) is None
        assert tracker.estimate("a", stream=True, now=0) is None

    @pytest.mark.parametrize("seconds", [-0.1, float("nan")])
    def test_refuses_a_sample_that_is_not_a_duration(self, seconds: float) -> None:
        with pytest.raises(ValueError, match="latency sample"):
            LatencyTracker().observe_ttft("a", seconds, now=0)

    @pytest.mark.parametrize(
        "options",
        [{"alpha": 0}, {"alpha": 1.5}, {"stale_after_s": 0}, {"tolerance": -0.1}],
    )
    def test_refuses_nonsense_settings(self, options: dict[str, float]) -> None:
        with pytest.raises(ValueError, match="must be"):
            LatencyTracker(**options)


class TestLowestLatency:
    def tracker(self) -> LatencyTracker:
        tracker = LatencyTracker()
        # "a" starts streaming sooner; "b" finishes whole responses sooner.
        tracker.observe_ttft("a", 0.1, now=0)
        tracker.observe_ttft("b", 0.4, now=0)
        tracker.observe_latency("a", 3.0, now=0)
        tracker.observe_latency("b", 2.0, now=0)
        return tracker

    def test_chooses_the_lower_ewma(self) -> None:
        tracker = LatencyTracker()
        tracker.observe_latency("fast", 0.5, now=0)
        tracker.observe_latency("slow", 1.5, now=0)
        candidates = [TargetStats("slow"), TargetStats("fast")]
        picks = first_picks("lowest_latency", candidates, n=100, latency=tracker, now=1)
        assert picks == {"fast": 100}

    def test_a_stream_goes_by_time_to_first_token(self) -> None:
        candidates = [TargetStats("a"), TargetStats("b")]
        order = choose(
            "lowest_latency",
            candidates,
            stream=True,
            rng=random.Random(1),
            latency=self.tracker(),
            now=1,
        )
        assert order == ["a", "b"]

    def test_a_non_stream_goes_by_total_latency(self) -> None:
        candidates = [TargetStats("a"), TargetStats("b")]
        order = choose(
            "lowest_latency",
            candidates,
            stream=False,
            rng=random.Random(1),
            latency=self.tracker(),
            now=1,
        )
        assert order == ["b", "a"]

    def test_an_untried_target_is_explored_alongside_the_fastest(self) -> None:
        tracker = LatencyTracker()
        tracker.observe_latency("fast", 0.5, now=0)
        tracker.observe_latency("slow", 1.5, now=0)
        candidates = [TargetStats("fast"), TargetStats("slow"), TargetStats("new")]
        picks = first_picks("lowest_latency", candidates, n=2000, latency=tracker, now=1)
        assert abs(picks["new"] / 2000 - 0.5) <= 0.05
        assert picks["slow"] == 0

    def test_a_stale_target_is_explored_again(self) -> None:
        tracker = LatencyTracker(stale_after_s=60)
        tracker.observe_latency("slow", 1.5, now=0)
        tracker.observe_latency("fast", 0.5, now=100)
        candidates = [TargetStats("fast"), TargetStats("slow")]
        picks = first_picks("lowest_latency", candidates, n=2000, latency=tracker, now=100)
        assert abs(picks["slow"] / 2000 - 0.5) <= 0.05

    def test_with_no_samples_at_all_it_splits_by_weight(self) -> None:
        candidates = [TargetStats("a", weight=1), TargetStats("b", weight=3)]
        picks = first_picks(
            "lowest_latency", candidates, n=2000, latency=LatencyTracker(), now=0, stream=True
        )
        assert abs(picks["b"] / 2000 - 0.75) <= 0.05

    def test_tolerance_ties_targets_about_as_fast(self) -> None:
        tracker = LatencyTracker(tolerance=0.1)
        tracker.observe_latency("a", 1.00, now=0)
        tracker.observe_latency("b", 1.05, now=0)
        tracker.observe_latency("c", 1.20, now=0)
        candidates = [TargetStats("a"), TargetStats("b"), TargetStats("c")]
        picks = first_picks("lowest_latency", candidates, n=2000, latency=tracker, now=0)
        assert abs(picks["b"] / 2000 - 0.5) <= 0.05
        assert picks["c"] == 0


class TestUsageBased:
    def test_picks_the_lowest_share_of_its_limit(self) -> None:
        candidates = [
            TargetStats("big", tpm_used=50_000, tpm_limit=100_000),  # 50 %
            TargetStats("small", tpm_used=2_000, tpm_limit=10_000),  # 20 %
            TargetStats("mid", tpm_used=12_000, tpm_limit=40_000),  # 30 %
        ]
        order = choose("usage_based", candidates, stream=False, rng=random.Random(1))
        assert order == ["small", "mid", "big"]

    def test_without_limits_it_compares_tokens(self) -> None:
        candidates = [TargetStats("a", tpm_used=900), TargetStats("b", tpm_used=100)]
        assert choose("usage_based", candidates, stream=False, rng=random.Random(1)) == ["b", "a"]

    def test_an_unlimited_target_counts_as_having_the_largest_limit(self) -> None:
        candidates = [
            TargetStats("limited", tpm_used=5_000, tpm_limit=10_000),  # 50 %
            TargetStats("unlimited", tpm_used=4_000),  # 4,000 of 10,000: 40 %
        ]
        order = choose("usage_based", candidates, stream=False, rng=random.Random(1))
        assert order == ["unlimited", "limited"]

    def test_a_limit_of_zero_ranks_last(self) -> None:
        candidates = [TargetStats("off", tpm_limit=0), TargetStats("on", 9_000, tpm_limit=10_000)]
        assert choose("usage_based", candidates, stream=False, rng=random.Random(1)) == [
            "on",
            "off",
        ]

    def test_ties_spread_over_both(self) -> None:
        candidates = [TargetStats("a", tpm_limit=1000), TargetStats("b", tpm_limit=1000)]
        picks = first_picks("usage_based", candidates, n=2000)
        assert abs(picks["a"] / 2000 - 0.5) <= 0.05


class TestRetryPolicy:
    @pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
    def test_retries_overload_and_server_errors(self, status: int) -> None:
        assert RetryPolicy().is_retryable(status)

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 501])
    def test_does_not_retry_what_fails_everywhere(self, status: int) -> None:
        assert not RetryPolicy().is_retryable(status)

    @pytest.mark.parametrize("error", ["connect", "timeout", "disconnect"])
    def test_retries_transport_errors(self, error: Any) -> None:
        assert RetryPolicy().is_retryable(None, error)

    def test_nothing_to_go_on_is_not_retried(self) -> None:
        assert not RetryPolicy().is_retryable(None)

    def test_never_after_the_first_byte_reached_the_client(self) -> None:
        policy = RetryPolicy()
        assert not policy.is_retryable(503, response_started=True)
        assert not policy.is_retryable(None, "timeout", response_started=True)

    def test_statuses_are_configurable(self) -> None:
        assert RetryPolicy(retry_on=frozenset({409})).is_retryable(409)
        assert 409 not in RETRYABLE_STATUSES

    def test_back_off_doubles_within_jitter_and_stops_at_the_cap(self) -> None:
        policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
        rng = random.Random(5)
        for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (60, 1.0)]:
            delays = [policy.delay(attempt, rng) for _ in range(200)]
            assert all(ceiling / 2 <= d <= ceiling for d in delays)
            # Jittered: spread over the range rather than one value.
            assert max(delays) - min(delays) > ceiling / 4
        assert policy.delay(10_000, rng) <= 1.0

    def test_the_first_retry_is_attempt_one(self) -> None:
        with pytest.raises(ValueError, match="attempt"):
            RetryPolicy().delay(0, random.Random(1))

    @pytest.mark.parametrize(
        "fields",
        [
            {"retries": -1},
            {"retries": 1.5},
            {"retries": True},
            {"base_delay_s": -0.1},
            {"base_delay_s": 3.0, "max_delay_s": 2.0},
            {"max_delay_s": float("inf")},
        ],
    )
    def test_refuses_nonsense(self, fields: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="must"):
            RetryPolicy(**fields)
