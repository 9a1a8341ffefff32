"""The one place a Redis client is built."""

from __future__ import annotations

from redis.asyncio import Redis

from control_plane.core.config import RedisSettings


def create_redis(settings: RedisSettings, *, url: str | None = None) -> Redis:
    return Redis.from_url(
        url or settings.url.get_secret_value(),
        decode_responses=False,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
    )
