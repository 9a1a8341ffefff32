"""The gateway's Prometheus metrics, in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)


class GatewayMetrics:
    """Labels: `route` is the name the client asked for (a router or an endpoint),
    `target` the endpoint that answered (or tried to)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "cp_gateway_requests",
            "Requests answered, by route, target and HTTP status.",
            ["route", "target", "status"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "cp_gateway_upstream_errors",
            "Failed upstream attempts (retried, fallen back or returned), by kind.",
            ["route", "target", "kind"],
            registry=registry,
        )
        self.tokens = Counter(
            "cp_gateway_tokens",
            "Tokens by direction (prompt, completion) as the upstream reported them.",
            ["route", "target", "direction"],
            registry=registry,
        )
        self.latency = Histogram(
            "cp_gateway_request_seconds",
            "Time from the request's arrival to the end of its response.",
            ["route", "target"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "cp_gateway_time_to_first_token_seconds",
            "Streams: time from the request's arrival to the first byte of the answer.",
            ["route", "target"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "cp_gateway_overhead_seconds",
            "Time spent in the gateway itself (everything but waiting for the upstream).",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.limited = Counter(
            "cp_gateway_limit_rejections",
            "Requests refused or moved on by a rate limit, by the limit's scope and kind.",
            ["scope", "kind"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "cp_gateway_fallbacks",
            "Requests answered by a fallback or a retry instead of their first target.",
            ["route"],
            registry=registry,
        )
        self.cooling = Gauge(
            "cp_gateway_target_cooling",
            "1 while a router's target is in cooldown in this gateway process.",
            ["route", "target"],
            registry=registry,
        )
        self.wakes = Counter(
            "cp_gateway_wakes",
            "Wake signals sent to endpoints at zero replicas.",
            ["target"],
            registry=registry,
        )
