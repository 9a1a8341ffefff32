"""The gateway rate limiter against a real redis-server (the one `cpctl dev` embeds):
exact counts under concurrency from several processes, all-or-nothing over several
limits, settle and release, the sliding window, and both policies for an unreachable
Redis. Each test uses its own key prefix, so tests share the server but no data."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import MaxConnectionsError

from control_plane.core.config import RedisSettings
from control_plane.core.redis import create_redis
from control_plane.devstack.services import EmbeddedRedis, free_port, start_service
from control_plane.routing.limiter import (
    Limit,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    RequestTooLarge,
    Reservation,
)

# --- fixtures ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """Only a redis-server: these tests need nothing else of the infra stack."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("limiter"), socket_tag=f"rl{os.getpid()}")
    running = await start_service(server.spec())
    try:
        yield server.url
    finally:
        await asyncio.to_thread(running.stop)


@pytest_asyncio.fixture(loop_scope="session")
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = create_redis(RedisSettings(), url=redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:rl:"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def limiter(redis: Redis, prefix: str, registry: CollectorRegistry) -> Limiter:
    return Limiter(redis, on_unavailable="fail_closed", prefix=prefix, registry=registry)


def rpm(scope: str, subject: str, limit: int, window_s: int = 60) -> Limit:
    return Limit(scope, subject, "requests", limit, window_s)


def tpm(scope: str, subject: str, limit: int, window_s: int = 60) -> Limit:
    return Limit(scope, subject, "tokens", limit, window_s)


async def fits(limiter: Limiter, limits: Sequence[Limit], tokens: int = 0) -> bool:
    try:
        await limiter.reserve(limits, tokens)
    except LimitExceeded:
        return False
    return True


async def how_many_fit(limiter: Limiter, limits: Sequence[Limit], tokens: int = 0) -> int:
    count = 0
    while await fits(limiter, limits, tokens):
        count += 1
    return count


def gateway_redis(url: str) -> Redis:
    """A client as a gateway process has one: a burst of concurrent requests waits for a
    pooled connection."""
    return create_redis(RedisSettings(), url=url)


# --- gateway replicas: separate OS processes sharing one Redis ----------------------------


@dataclass(frozen=True)
class Outcome:
    tokens: int
    # None when the reservation succeeded.
    blocked_by: Limit | None = None
    retry_after_s: float | None = None


async def _replica_burst(
    url: str, prefix: str, limits: list[Limit], requests: list[int], barrier: Barrier
) -> list[Outcome]:
    redis = gateway_redis(url)
    limiter = Limiter(
        redis, on_unavailable="fail_closed", prefix=prefix, registry=CollectorRegistry()
    )
    await redis.ping()
    await asyncio.to_thread(barrier.wait, 60)

    async def one(tokens: int) -> Outcome:
        try:
            await limiter.reserve(limits, tokens)
        except LimitExceeded as exceeded:
            return Outcome(tokens, exceeded.limit, exceeded.retry_after_s)
        return Outcome(tokens)

    try:
        return list(await asyncio.gather(*(one(tokens) for tokens in requests)))
    finally:
        await redis.aclose()


def _replica(
    url: str,
    prefix: str,
    limits: list[Limit],
    requests: list[int],
    barrier: Barrier,
    results: Any,
) -> None:
    results.put(asyncio.run(_replica_burst(url, prefix, limits, requests, barrier)))


def run_replicas(
    url: str, prefix: str, limits: list[Limit], requests_per_replica: list[list[int]]
) -> list[Outcome]:
    """One gateway process per list of requests, all released at once, each sending its
    requests concurrently."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(requests_per_replica))
    results = context.Queue()
    processes = [
        context.Process(target=_replica, args=(url, prefix, limits, requests, barrier, results))
        for requests in requests_per_replica
    ]
    for process in processes:
        process.start()
    try:
        outcomes: list[Outcome] = []
        for _ in processes:
            outcomes += results.get(timeout=90)
        return outcomes
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


class TestReplicasShareTheLimits:
    async def test_rpm_100_lets_exactly_100_of_1000_concurrent_requests_through(
        self, redis_url: str, redis: Redis, prefix: str
    ) -> None:
        target = rpm("target", "t-1", 100)
        outcomes = await asyncio.to_thread(
            run_replicas, redis_url, prefix, [target], [[0] * 250 for _ in range(4)]
        )

        assert len(outcomes) == 1000
        assert sum(o.blocked_by is None for o in outcomes) == 100
        rejected = [o for o in outcomes if o.blocked_by is not None]
        assert len(rejected) == 900
        assert all(o.blocked_by == target for o in rejected)
        assert all(o.retry_after_s is not None and 0 < o.retry_after_s <= 60 for o in rejected)
        assert await redis.zcard(target.key(prefix)) == 100

    async def test_tpm_never_overshoots_with_concurrent_large_reservations(
        self, redis_url: str, prefix: str
    ) -> None:
        limit = 50_000
        project = tpm("project", "p-1", limit)
        draw = random.Random(7)
        requests = [[draw.randint(2_000, 16_000) for _ in range(60)] for _ in range(4)]

        outcomes = await asyncio.to_thread(run_replicas, redis_url, prefix, [project], requests)

        reserved = sum(o.tokens for o in outcomes if o.blocked_by is None)
        rejected = [o for o in outcomes if o.blocked_by is not None]
        assert reserved <= limit
        assert rejected
        # Usage only grew during the burst, so a request refused then is refused now:
        # no request was turned away while it would have fitted.
        assert all(reserved + o.tokens > limit for o in rejected)
        assert all(o.blocked_by == project for o in rejected)


# --- in one process ----------------------------------------------------------------------


class TestAllOrNothing:
    async def test_a_request_blocked_by_the_project_records_nothing_elsewhere(
        self, limiter: Limiter
    ) -> None:
        target, key = rpm("target", "t-1", 5), rpm("api_key", "k-1", 5)
        project = rpm("project", "p-1", 1)
        await limiter.reserve([target, key, project], 0)

        for _ in range(3):
            with pytest.raises(LimitExceeded) as blocked:
                await limiter.reserve([target, key, project], 0)
            assert blocked.value.limit == project

        # Only the first request counted on the target and the key: four more fit.
        assert await how_many_fit(limiter, [target, key]) == 4

    async def test_tokens_blocked_by_one_limit_are_not_counted_on_the_others(
        self, limiter: Limiter
    ) -> None:
        target, project = tpm("target", "t-1", 10_000), tpm("project", "p-1", 1_000)
        await limiter.reserve([target, project], 600)
        with pytest.raises(LimitExceeded) as blocked:
            await limiter.reserve([target, project], 600)
        assert blocked.value.limit == project

        # The target holds the first 600 only.
        assert await fits(limiter, [target], 9_400)
        assert not await fits(limiter, [target], 1)

    async def test_the_limit_named_is_the_one_that_frees_up_last(self, limiter: Limiter) -> None:
        short, long = rpm("api_key", "k-1", 1, window_s=1), rpm("project", "p-1", 1, window_s=30)
        await limiter.reserve([short, long], 0)

        with pytest.raises(LimitExceeded) as blocked:
            await limiter.reserve([short, long], 0)

        assert blocked.value.limit == long
        assert 29 < blocked.value.retry_after_s <= 30
        assert blocked.value.headers == {"Retry-After": "30"}

    async def test_a_request_larger_than_a_limit_never_fits(self, limiter: Limiter) -> None:
        target, project = tpm("target", "t-1", 10_000), tpm("project", "p-1", 1_000)
        with pytest.raises(RequestTooLarge) as too_large:
            await limiter.reserve([target, project], 1_001)

        assert too_large.value.limit == project
        assert too_large.value.status == 413
        assert too_large.value.headers == {}
        assert await fits(limiter, [target], 10_000)


class TestSettleAndRelease:
    async def test_settling_below_the_reservation_frees_capacity(self, limiter: Limiter) -> None:
        project = tpm("project", "p-1", 10_000)
        reservations = [await limiter.reserve([project], 3_000) for _ in range(3)]
        assert not await fits(limiter, [project], 3_000)

        for reservation in reservations:
            await limiter.settle(reservation, 500)

        assert await fits(limiter, [project], 8_500)
        assert not await fits(limiter, [project], 1)

    async def test_settling_twice_counts_once(self, limiter: Limiter) -> None:
        project = tpm("project", "p-1", 1_000)
        reservation = await limiter.reserve([project], 800)

        for _ in range(3):
            await limiter.settle(reservation, 300)

        assert await fits(limiter, [project], 700)
        assert not await fits(limiter, [project], 1)

    async def test_settling_above_the_reservation_takes_more(self, limiter: Limiter) -> None:
        project = tpm("project", "p-1", 1_000)
        reservation = await limiter.reserve([project], 100)

        await limiter.settle(reservation, 900)

        assert not await fits(limiter, [project], 101)
        assert await fits(limiter, [project], 100)

    async def test_release_gives_back_the_request_and_its_tokens_once(
        self, limiter: Limiter
    ) -> None:
        target, project = rpm("target", "t-1", 2), tpm("project", "p-1", 1_000)
        first = await limiter.reserve([target, project], 400)
        await limiter.reserve([target, project], 400)
        assert not await fits(limiter, [target, project], 100)

        await limiter.release(first)
        await limiter.release(first)

        assert await fits(limiter, [project], 600)
        assert not await fits(limiter, [project], 1)
        assert await how_many_fit(limiter, [target]) == 1

    async def test_settling_a_released_reservation_brings_nothing_back(
        self, limiter: Limiter
    ) -> None:
        project = tpm("project", "p-1", 1_000)
        reservation = await limiter.reserve([project], 900)
        await limiter.release(reservation)

        await limiter.settle(reservation, 900)

        assert await fits(limiter, [project], 1_000)

    async def test_settling_after_the_window_moved_on_is_harmless(self, limiter: Limiter) -> None:
        project = tpm("project", "p-1", 1_000, window_s=1)
        reservation = await limiter.reserve([project], 1_000)
        await asyncio.sleep(1.1)

        await limiter.settle(reservation, 5_000)

        assert await fits(limiter, [project], 1_000)

    async def test_requests_only_reservations_settle_without_redis(self, limiter: Limiter) -> None:
        target = rpm("target", "t-1", 1)
        reservation = await limiter.reserve([target], 50)

        await limiter.settle(reservation, 10)

        assert not await fits(limiter, [target])


class TestSlidingWindow:
    """Expectations are measured from when each reservation was made, so a late wake-up
    of the test itself does not count against the limiter."""

    async def test_capacity_comes_back_one_entry_at_a_time(self, limiter: Limiter) -> None:
        clock = asyncio.get_running_loop().time
        target = rpm("target", "t-1", 2, window_s=2)
        await limiter.reserve([target], 0)
        first = clock()
        await asyncio.sleep(1)
        await limiter.reserve([target], 0)
        second = clock()

        with pytest.raises(LimitExceeded) as blocked:
            await limiter.reserve([target], 0)
        assert blocked.value.retry_after_s == pytest.approx(first + 2 - clock(), abs=0.25)

        await asyncio.sleep(blocked.value.retry_after_s + 0.05)
        await limiter.reserve([target], 0)
        with pytest.raises(LimitExceeded) as again:
            await limiter.reserve([target], 0)
        # One slot came back, not the whole window: now the second entry blocks.
        assert again.value.retry_after_s == pytest.approx(second + 2 - clock(), abs=0.25)

    async def test_tokens_wait_for_enough_old_reservations_to_leave(self, limiter: Limiter) -> None:
        clock = asyncio.get_running_loop().time
        project = tpm("project", "p-1", 1_000, window_s=3)
        await limiter.reserve([project], 600)
        first = clock()
        await asyncio.sleep(1)
        await limiter.reserve([project], 300)
        second = clock()

        with pytest.raises(LimitExceeded) as small:
            await limiter.reserve([project], 500)
        small_expected = first + 3 - clock()
        with pytest.raises(LimitExceeded) as large:
            await limiter.reserve([project], 800)
        large_expected = second + 3 - clock()

        # 500 fits once the 600 leaves; 800 needs the 300 gone as well.
        assert small.value.retry_after_s == pytest.approx(small_expected, abs=0.25)
        assert large.value.retry_after_s == pytest.approx(large_expected, abs=0.25)

    async def test_idle_limits_expire(self, limiter: Limiter, redis: Redis, prefix: str) -> None:
        await limiter.reserve([rpm("target", "t-1", 5, 2), tpm("project", "p-1", 100, 2)], 10)

        keys = await redis.keys(prefix + "*")
        assert len(keys) == 3
        ttls = [await redis.pttl(key) for key in keys]
        assert all(0 < ttl <= 2_000 for ttl in ttls)


# --- Redis unreachable -----------------------------------------------------------------


def unreachable(policy: Any, registry: CollectorRegistry, **options: Any) -> Limiter:
    redis = create_redis(RedisSettings(), url=f"redis://127.0.0.1:{free_port()}")
    return Limiter(redis, on_unavailable=policy, registry=registry, **options)


def unavailable_total(registry: CollectorRegistry, policy: str) -> float | None:
    return registry.get_sample_value("cp_gateway_limiter_unavailable_total", {"policy": policy})


class TestRedisUnreachable:
    async def test_fail_open_lets_requests_through_and_counts_them(
        self, registry: CollectorRegistry
    ) -> None:
        limiter = unreachable("fail_open", registry)
        assert registry.get_sample_value("cp_gateway_limiter_up") == 1

        reservations = [await limiter.reserve([rpm("target", "t-1", 1)], 10) for _ in range(3)]

        assert all(r.degraded for r in reservations)
        await limiter.settle(reservations[0], 20)
        await limiter.release(reservations[1])
        assert unavailable_total(registry, "fail_open") == 3
        assert registry.get_sample_value("cp_gateway_limiter_up") == 0

    async def test_fail_closed_refuses_with_503(self, registry: CollectorRegistry) -> None:
        limiter = unreachable("fail_closed", registry)

        for _ in range(2):
            with pytest.raises(LimiterUnavailable) as refused:
                await limiter.reserve([tpm("project", "p-1", 1_000)], 10)

        assert refused.value.status == 503
        assert refused.value.dependency == "redis"
        assert unavailable_total(registry, "fail_closed") == 2
        assert registry.get_sample_value("cp_gateway_limiter_up") == 0

    async def test_an_exhausted_connection_pool_is_not_an_outage(
        self, redis_url: str, prefix: str, registry: CollectorRegistry
    ) -> None:
        # A non-blocking pool, which raises once its connections are all in use (the
        # project's clients wait for one instead: `create_redis`).
        redis = Redis.from_url(redis_url, max_connections=20)
        limiter = Limiter(redis, on_unavailable="fail_open", prefix=prefix, registry=registry)
        target = rpm("target", "t-1", 50)
        try:
            outcomes = await asyncio.gather(
                *(limiter.reserve([target], 0) for _ in range(300)), return_exceptions=True
            )
        finally:
            await redis.aclose()

        through = [o for o in outcomes if isinstance(o, Reservation)]
        assert len(through) <= 50
        assert not any(r.degraded for r in through)
        assert any(isinstance(o, MaxConnectionsError) for o in outcomes)
        assert all(
            isinstance(o, Reservation | LimitExceeded | MaxConnectionsError) for o in outcomes
        )
        assert unavailable_total(registry, "fail_open") == 0
        assert registry.get_sample_value("cp_gateway_limiter_up") == 1

    async def test_limits_apply_again_once_redis_is_back(
        self, tmp_path: Path, registry: CollectorRegistry
    ) -> None:
        server = EmbeddedRedis(tmp_path, socket_tag=f"rb{uuid.uuid4().hex[:8]}")
        redis = create_redis(RedisSettings(), url=server.url)
        limiter = Limiter(
            redis, on_unavailable="fail_closed", registry=registry, probe_interval_s=0
        )
        target = rpm("target", "t-1", 1)
        with pytest.raises(LimiterUnavailable):
            await limiter.reserve([target], 0)

        running = await start_service(server.spec())
        try:
            reservation: Reservation = await limiter.reserve([target], 0)
            assert not reservation.degraded
            assert registry.get_sample_value("cp_gateway_limiter_up") == 1
            with pytest.raises(LimitExceeded):
                await limiter.reserve([target], 0)
        finally:
            await redis.aclose()
            await asyncio.to_thread(running.stop)
