"""The one place a Redis client is built."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

from control_plane.core.config import RedisSettings

# Seconds a command waits for a free pooled connection before failing.
POOL_WAIT_S = 10


def create_redis(
    settings: RedisSettings, *, url: str | None = None, max_connections: int = 64
) -> Redis:
    """A client over a blocking pool: a burst of concurrent commands waits for one of
    `max_connections` connections instead of failing (the default pool raises
    `MaxConnectionsError` once it is exhausted), and no burst opens unbounded sockets."""
    pool = BlockingConnectionPool.from_url(
        url or settings.url.get_secret_value(),
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=False,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
    )
    return Redis.from_pool(pool)
