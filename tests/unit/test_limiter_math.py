"""Rate limiter logic that needs no Redis: limits, keys, what can never fit, the errors a
gateway renders, and the metrics wiring. The client points at a port where nothing
listens; these paths must never reach it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from control_plane.core.errors import ControlPlaneError, DependencyUnavailable
from control_plane.devstack.services import free_port
from control_plane.routing.limiter import (
    AMOUNTS_SUFFIX,
    Limit,
    Limiter,
    LimitError,
    LimiterUnavailable,
    LimitExceeded,
    RequestTooLarge,
    Reservation,
    check_fits,
    reserve_call,
    retry_after_header,
)


@pytest_asyncio.fixture(loop_scope="session")
async def nowhere() -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}")
    yield client
    await client.aclose()


def closed_limiter(redis: Redis, registry: CollectorRegistry | None = None) -> Limiter:
    return Limiter(redis, on_unavailable="fail_closed", registry=registry or CollectorRegistry())


class TestLimit:
    def test_defaults_to_a_one_minute_window(self) -> None:
        assert Limit("target", "t-1", "requests", 100).window_s == 60

    @pytest.mark.parametrize(
        "fields",
        [
            {"kind": "bytes"},
            {"limit": -1},
            {"window_s": 0},
            {"scope": "a:b"},
        ],
    )
    def test_rejects_nonsense(self, fields: dict[str, Any]) -> None:
        values: dict[str, Any] = {
            "scope": "target",
            "subject": "t-1",
            "kind": "requests",
            "limit": 10,
            "window_s": 60,
        }
        with pytest.raises(ValueError, match="must"):
            Limit(**(values | fields))

    def test_a_request_costs_one_request_or_its_tokens(self) -> None:
        assert Limit("target", "t-1", "requests", 10).cost(500) == 1
        assert Limit("target", "t-1", "tokens", 10).cost(500) == 500


class TestKeys:
    def test_keys_are_deterministic_and_carry_the_prefix(self) -> None:
        limit = Limit("api_key", "k-1", "tokens", 1000, 60)
        assert limit.key("cp:rl:") == "cp:rl:api_key:k-1:tokens:60"
        assert limit.key("cp:rl:") == Limit("api_key", "k-1", "tokens", 5, 60).key("cp:rl:")

    def test_each_kind_and_window_has_its_own_key(self) -> None:
        keys = {
            Limit("project", "p", "requests", 10, 60).key(),
            Limit("project", "p", "tokens", 10, 60).key(),
            Limit("project", "p", "requests", 10, 3600).key(),
            Limit("target", "p", "requests", 10, 60).key(),
        }
        assert len(keys) == 4

    def test_script_arguments_are_flat_with_two_keys_per_token_limit(self) -> None:
        limits = [
            Limit("target", "t", "requests", 100, 60),
            Limit("project", "p", "tokens", 5000, 2),
        ]
        keys, args = reserve_call("x:", "rid", limits, 42)
        assert keys == [
            "x:target:t:requests:60",
            "x:project:p:tokens:2",
            "x:project:p:tokens:2" + AMOUNTS_SUFFIX,
        ]
        assert args == ["rid", 42, "r", 100, 60_000, "t", 5000, 2_000]


class TestWhatCanNeverFit:
    def test_more_tokens_than_the_limit_is_too_large(self) -> None:
        project = Limit("project", "p", "tokens", 1000)
        with pytest.raises(RequestTooLarge) as too_large:
            check_fits([Limit("target", "t", "tokens", 5000), project], 1001)
        assert too_large.value.limit == project
        assert too_large.value.requested == 1001

    def test_exactly_the_limit_fits(self) -> None:
        check_fits([Limit("project", "p", "tokens", 1000)], 1000)

    def test_a_requests_limit_of_zero_blocks_everything(self) -> None:
        with pytest.raises(RequestTooLarge):
            check_fits([Limit("api_key", "k", "requests", 0)], 0)

    def test_negative_tokens_are_a_bug(self) -> None:
        with pytest.raises(ValueError, match="tokens"):
            check_fits([], -1)


class TestErrors:
    def test_retry_after_rounds_up_to_whole_seconds_at_least_one(self) -> None:
        assert [retry_after_header(s) for s in (0.001, 0.5, 1.0, 1.001, 59.9)] == [
            1,
            1,
            1,
            2,
            60,
        ]

    def test_limit_exceeded_is_a_429_naming_the_limit(self) -> None:
        limit = Limit("api_key", "k-1", "requests", 100, 60)
        error = LimitExceeded(limit, retry_after_s=12.3)
        assert isinstance(error, LimitError)
        assert isinstance(error, ControlPlaneError)
        assert error.status == 429
        assert error.headers == {"Retry-After": "13"}
        assert error.extra == {
            "scope": "api_key",
            "subject": "k-1",
            "kind": "requests",
            "limit": 100,
            "window_s": 60,
            "retry_after_s": 12.3,
        }

    def test_too_large_is_a_413_without_retry_after(self) -> None:
        error = RequestTooLarge(Limit("project", "p", "tokens", 10), requested=11)
        assert isinstance(error, LimitError)
        assert error.status == 413
        assert error.headers == {}
        assert error.extra["requested"] == 11

    def test_unavailable_is_a_503_on_redis(self) -> None:
        error = LimiterUnavailable()
        assert isinstance(error, DependencyUnavailable)
        assert (error.status, error.dependency) == (503, "redis")


class TestLimiterWithoutRedis:
    async def test_no_limits_needs_no_redis(self, nowhere: Redis) -> None:
        reservation = await closed_limiter(nowhere).reserve([], 10_000)
        assert not reservation.degraded
        assert reservation.limits == ()

    async def test_too_large_is_decided_before_calling_redis(self, nowhere: Redis) -> None:
        with pytest.raises(RequestTooLarge):
            await closed_limiter(nowhere).reserve([Limit("project", "p", "tokens", 10)], 11)

    async def test_settling_a_requests_only_reservation_needs_no_redis(
        self, nowhere: Redis
    ) -> None:
        limiter = closed_limiter(nowhere)
        await limiter.settle(Reservation("r", (Limit("target", "t", "requests", 5),), 50), 30)

    async def test_degraded_reservations_are_neither_settled_nor_released(
        self, nowhere: Redis
    ) -> None:
        limiter = closed_limiter(nowhere)
        degraded = Reservation("r", (Limit("target", "t", "tokens", 500),), 50, degraded=True)
        await limiter.settle(degraded, 30)
        await limiter.release(degraded)

    def test_limiters_may_share_a_registry(self, nowhere: Redis) -> None:
        registry = CollectorRegistry()
        closed_limiter(nowhere, registry)
        Limiter(nowhere, on_unavailable="fail_open", registry=registry)
        assert registry.get_sample_value("cp_gateway_limiter_up") == 1
        for policy in ("fail_open", "fail_closed"):
            assert (
                registry.get_sample_value(
                    "cp_gateway_limiter_unavailable_total", {"policy": policy}
                )
                == 0
            )

    def test_unknown_policy_is_refused(self, nowhere: Redis) -> None:
        with pytest.raises(ValueError, match="policy"):
            Limiter(nowhere, on_unavailable="maybe", registry=CollectorRegistry())  # type: ignore[arg-type]
