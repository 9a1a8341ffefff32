"""Routers, strategies, rate limiter and cooldown: pure logic plus Redis scripts."""
