"""The OpenAI-compatible gateway (data plane): `cpctl gateway`.

A bare ASGI application — every microsecond here is paid by every request:

1. **Authenticate** the project API key (`Authorization: Bearer cpk_...`) against the
   in-memory routing table (`api.gateway.table`): no database call per request.
2. **Resolve** `model` to a router or an endpoint of the key's project (and the key's
   allowed models).
3. **Plan**: the router's strategy orders its targets (targets in cooldown left out),
   then its fallbacks follow in order.
4. **Limit**: RPM/TPM of the key and of the target are reserved atomically in Redis
   (prompt tokens, estimated, + `max_tokens`) before forwarding and settled with the
   real usage after; a target's own limit moves the request on to the next target.
5. **Forward** over one pooled HTTP client to the least-busy ready replica; an endpoint
   at zero replicas is woken (the `wake` signal of its workflow) and waited for.
   Connection errors and retryable statuses (429, 5xx) cool the target down and move
   on, with back-off — but only before the first byte of the answer reached the
   client. Streams pass through event by event, unbuffered.

Every answer carries `x-cp-target` (the endpoint that answered) and `x-cp-overhead-ms`
(time spent in the gateway itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from temporalio.client import Client

from api.gateway.metrics import GatewayMetrics
from api.gateway.table import (
    EndpointEntry,
    KeyEntry,
    ReplicaEntry,
    RouterEntry,
    RoutingTable,
    TargetEntry,
)
from control_plane.core.config import GatewaySettings
from control_plane.core.logging import get_logger
from control_plane.core.security import constant_time_equal, sha256_hex
from control_plane.identity.authn import split_api_key
from control_plane.identity.permissions import scope_grants
from control_plane.routing.limiter import (
    Limit,
    Limiter,
    LimitError,
    LimiterUnavailable,
    LimitExceeded,
    RequestTooLarge,
    Reservation,
)
from control_plane.routing.strategies import LatencyTracker, RetryPolicy, choose
from control_plane.usage.recorder import UsageEntry, UsageRecorder
from workflows.contracts.endpoints import WAKE_SIGNAL, endpoint_workflow_id

log = get_logger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

INFERENCE_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
GATEWAY_SCOPE = "gateway:write"
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
# Upstream headers worth passing on (everything else is hop-by-hop or ours).
PASSED_HEADERS = frozenset({"content-type", "retry-after", "x-request-id"})
# A prompt token is about this many bytes of request JSON (when no tokenizer is known).
BYTES_PER_TOKEN = 4
KEEPALIVE_S = 4.0
# Waits between two wake signals to the same endpoint.
WAKE_RESEND_S = 10.0


class GatewayError(Exception):
    """An OpenAI-style error answered by the gateway itself."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.headers = headers or []

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return json.dumps({"error": error}).encode()


class _Retryable(Exception):
    """An attempt that failed before anything reached the client: try the next one."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        retry_after_s: float | None = None,
        cool: bool = True,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.body = body
        self.headers = headers or []
        self.retry_after_s = retry_after_s
        self.cool = cool


@dataclass(slots=True)
class Candidate:
    """One place a request may go: an endpoint, through a router target or directly."""

    endpoint_id: uuid.UUID
    router: RouterEntry | None = None
    target: TargetEntry | None = None
    fallback: bool = False


@dataclass(slots=True)
class Call:
    """One request as the gateway handles it."""

    kind: str
    path: str
    key: KeyEntry
    model: str
    payload: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    reserve_tokens: int
    arrived: float
    # Seconds spent waiting on upstreams (and wakes): not the gateway's overhead.
    waited: float = 0.0
    attempts: int = 0
    tried: list[str] = field(default_factory=list)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _usage_of(payload: Any) -> tuple[int, int] | None:
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body over {limit} bytes", "invalid_request_error")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Gateway:
    """The ASGI application; one per process."""

    def __init__(
        self,
        settings: GatewaySettings,
        table: RoutingTable,
        limiter: Limiter,
        *,
        temporal: Client | None = None,
        registry: CollectorRegistry | None = None,
        usage: UsageRecorder | None = None,
        rng: random.Random | None = None,
        startup: Callable[[], Awaitable[None]] | None = None,
        shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.limiter = limiter
        self.temporal = temporal
        self.registry = registry or CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.rng = rng or random.Random()
        self.latency = LatencyTracker()
        self.usage = usage
        self._startup = startup
        self._shutdown = shutdown
        self._http: aiohttp.ClientSession | None = None
        self._woken: dict[uuid.UUID, float] = {}

    # --- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http_request(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as err:
                    log.error("gateway.start_failed", error=str(err))
                    await send({"type": "lifespan.startup.failed", "message": str(err)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self.settings.pool_per_host,
            ttl_dns_cache=300,
            # Below the 5 s idle timeout of uvicorn-based engines (vLLM, ours): close an
            # idle connection before the upstream does, rather than write into a closed one.
            keepalive_timeout=KEEPALIVE_S,
        )
        self._http = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.connect_timeout_seconds
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        if self._startup is not None:
            await self._startup()

    async def stop(self) -> None:
        if self._shutdown is not None:
            await self._shutdown()
        if self._http is not None:
            await self._http.close()

    async def _http_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        try:
            kind = INFERENCE_PATHS.get(path)
            if kind is not None and method == "POST":
                await self._infer(kind, path, scope, receive, send)
            elif path == "/v1/models" and method == "GET":
                await self._models(scope, send)
            elif path == "/metrics" and method == "GET":
                body = generate_latest(self.registry)
                await _respond(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])
            elif path in ("/healthz", "/readyz") and method == "GET":
                ready = path == "/healthz" or self.table.loaded
                await _respond(send, 200 if ready else 503, b"", [])
            else:
                raise GatewayError(404, f"no route {method} {path}", "invalid_request_error")
        except GatewayError as err:
            await _respond(send, err.status, err.body(), JSON_HEADERS + err.headers)
        except ConnectionResetError:
            return

    # --- requests ---------------------------------------------------------------------

    def _authenticate(self, scope: Scope) -> KeyEntry:
        raw = _header(scope, b"authorization")
        if raw is None or not raw[:7].lower() == b"bearer ":
            raise GatewayError(401, "missing bearer API key", "authentication_error")
        token = raw[7:].decode("latin-1").strip()
        try:
            prefix, secret = split_api_key(token)
        except Exception:
            raise GatewayError(401, "malformed API key", "authentication_error") from None
        key = self.table.keys.get(prefix)
        if key is None or not constant_time_equal(key.secret_hash, sha256_hex(secret)):
            raise GatewayError(401, "invalid or revoked API key", "authentication_error")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise GatewayError(401, "API key expired", "authentication_error")
        if not any(scope_grants(granted, GATEWAY_SCOPE) for granted in key.scopes):
            raise GatewayError(
                403, f"the API key lacks the {GATEWAY_SCOPE} scope", "permission_error"
            )
        return key

    async def _models(self, scope: Scope, send: Send) -> None:
        key = self._authenticate(scope)
        names = self.table.names_of(key.project_id)
        if key.allowed_models is not None:
            names = [n for n in names if n in key.allowed_models]
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "control-plane"} for n in names
        ]
        await _respond(
            send, 200, json.dumps({"object": "list", "data": data}).encode(), JSON_HEADERS
        )

    def _parse(self, kind: str, path: str, body: bytes, key: KeyEntry, arrived: float) -> Call:
        try:
            payload = json.loads(body)
        except ValueError:
            raise GatewayError(400, "the body is not valid JSON", "invalid_request_error") from None
        if not isinstance(payload, dict):
            raise GatewayError(400, "the body must be a JSON object", "invalid_request_error")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required", "invalid_request_error")
        stream = payload.get("stream") is True
        options = payload.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if kind == "embedding":
            answer = 0
        else:
            asked = payload.get("max_completion_tokens", payload.get("max_tokens"))
            answer = (
                asked if isinstance(asked, int) and asked > 0 else self.settings.default_max_tokens
            )
        return Call(
            kind=kind,
            path=path,
            key=key,
            model=model,
            payload=payload,
            stream=stream,
            client_wants_usage=wants_usage,
            reserve_tokens=len(body) // BYTES_PER_TOKEN + answer,
            arrived=arrived,
        )

    async def _infer(
        self, kind: str, path: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        arrived = time.perf_counter()
        key = self._authenticate(scope)
        body = await _read_body(receive, self.settings.max_body_bytes)
        call = self._parse(kind, path, body, key, arrived)
        try:
            await self._route(call, self._resolve(call), send)
        except GatewayError as err:
            # Refused by the gateway (unknown model, a limit, nothing available): usage
            # shows these too.
            self._record(call, err.status, None, None, None)
            raise

    def _resolve(self, call: Call) -> RouterEntry | EndpointEntry:
        key = call.key
        if key.allowed_models is not None and call.model not in key.allowed_models:
            raise GatewayError(
                403,
                f"the API key may not use model {call.model!r}",
                "permission_error",
                "model_not_allowed",
            )
        route = self.table.resolve(key.project_id, call.model)
        if route is None:
            raise GatewayError(
                404,
                f"the model {call.model!r} does not exist in this project",
                "invalid_request_error",
                "model_not_found",
            )
        return route

    # --- planning ---------------------------------------------------------------------

    def _router_order(
        self, router: RouterEntry, call: Call, *, has_fallback: bool
    ) -> list[Candidate]:
        now = time.monotonic()
        live = [t for t in router.targets if t.endpoint_id in self.table.endpoints]
        if not live:
            return []
        keys = router.cooldowns.available([t.key for t in live], now, has_fallback=has_fallback)
        by_key = {t.key: t for t in live}
        if router.strategy == "least_busy":
            endpoints = self.table.endpoints
            for target in live:
                endpoint = endpoints[target.endpoint_id]
                # This process's requests and the other gateway processes' (shared).
                target.stats.in_flight = endpoint.in_flight + endpoint.remote_in_flight
        stats = [by_key[k].stats for k in keys]
        order = choose(
            router.strategy, stats, stream=call.stream, rng=self.rng, latency=self.latency, now=now
        )
        return [Candidate(by_key[k].endpoint_id, router, by_key[k]) for k in order]

    def _fallbacks(self, router: RouterEntry, call: Call) -> list[Candidate]:
        found: list[Candidate] = []
        for kind, ref in router.fallbacks:
            if kind == "endpoint" and ref in self.table.endpoints:
                found.append(Candidate(ref, fallback=True))
            elif kind == "router" and (other := self.table.routers.get(ref)) is not None:
                for candidate in self._router_order(other, call, has_fallback=True):
                    candidate.fallback = True
                    found.append(candidate)
        return found

    def _plan(self, route: RouterEntry | EndpointEntry, call: Call) -> list[Candidate]:
        """Every attempt in order: the first target, `retries` more over the targets in
        the strategy's order, then each fallback once."""
        if isinstance(route, EndpointEntry):
            return [Candidate(route.id)]
        fallbacks = self._fallbacks(route, call)
        primary = self._router_order(route, call, has_fallback=bool(fallbacks))
        attempts = [primary[i % len(primary)] for i in range(1 + route.retries)] if primary else []
        return attempts + fallbacks

    # --- routing ----------------------------------------------------------------------

    async def _route(self, call: Call, route: RouterEntry | EndpointEntry, send: Send) -> None:
        plan = self._plan(route, call)
        if not plan:
            raise GatewayError(
                503, f"no target of {call.model!r} is available", "service_unavailable"
            )
        backoff = route.retry_backoff_s if isinstance(route, RouterEntry) else 0.0
        policy = RetryPolicy(retries=len(plan), base_delay_s=backoff, max_delay_s=max(backoff, 2.0))
        last: _Retryable | None = None
        for number, candidate in enumerate(plan):
            if last is not None:
                if self._cooling(candidate) and number + 1 < len(plan):
                    continue
                if last.kind != "limit" and backoff > 0:
                    delay = policy.delay(number, self.rng)
                    await asyncio.sleep(delay)
                    call.waited += delay
            call.attempts += 1
            try:
                await self._attempt(call, route, candidate, send)
            except _Retryable as err:
                last = err
                self._failed(call, candidate, err)
                continue
            if call.attempts > 1:
                self.metrics.fallbacks.labels(call.model).inc()
            return
        assert last is not None
        if last.status is not None:
            # The last upstream's own answer (a 429 with its Retry-After, a 503...).
            await self._send_error(send, call, last.status, last.body, last.headers)
            return
        limited = last.kind == "limit"
        raise GatewayError(
            429 if limited else 503,
            f"no target of {call.model!r} could answer: {last}",
            "rate_limit_error" if limited else "service_unavailable",
            "rate_limit_exceeded" if limited else None,
            headers=last.headers,
        )

    def _cooling(self, candidate: Candidate) -> bool:
        if candidate.router is None or candidate.target is None:
            return False
        return candidate.router.cooldowns.is_cooling(candidate.target.key, time.monotonic())

    def _failed(self, call: Call, candidate: Candidate, err: _Retryable) -> None:
        endpoint = self.table.endpoints.get(candidate.endpoint_id)
        target = endpoint.name if endpoint is not None else str(candidate.endpoint_id)
        call.tried.append(target)
        self.metrics.upstream_errors.labels(call.model, target, err.kind).inc()
        if candidate.router is not None and candidate.target is not None and err.cool:
            cooldowns = candidate.router.cooldowns
            started = cooldowns.record_failure(
                candidate.target.key,
                now=time.monotonic(),
                retry_after_s=err.retry_after_s,
                rate_limited=err.status == 429,
            )
            if started:
                self.metrics.cooling.labels(candidate.router.name, target).set(1)
                log.info(
                    "gateway.cooldown.started",
                    router=candidate.router.name,
                    target=target,
                    reason=str(err),
                )

    def _limits(self, call: Call, candidate: Candidate) -> list[Limit]:
        limits: list[Limit] = []
        key = call.key
        if key.rpm is not None:
            limits.append(Limit("api_key", str(key.id), "requests", key.rpm))
        if key.tpm is not None:
            limits.append(Limit("api_key", str(key.id), "tokens", key.tpm))
        target = candidate.target
        if target is not None:
            if target.rpm is not None:
                limits.append(Limit("target", target.key, "requests", target.rpm))
            if target.tpm is not None:
                limits.append(Limit("target", target.key, "tokens", target.tpm))
        return limits

    async def _reserve(self, call: Call, candidate: Candidate) -> Reservation | None:
        limits = self._limits(call, candidate)
        if not limits:
            return None
        try:
            return await self.limiter.reserve(limits, call.reserve_tokens)
        except LimitError as err:
            limit = err.limit
            self.metrics.limited.labels(limit.scope, limit.kind).inc()
            if limit.scope == "target":
                # The target is full, the key is not: another target may take it.
                headers = [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
                retry = err.retry_after_s if isinstance(err, LimitExceeded) else None
                raise _Retryable(
                    "limit", str(err), headers=headers, retry_after_s=retry, cool=False
                ) from None
            status = 413 if isinstance(err, RequestTooLarge) else 429
            raise GatewayError(
                status,
                str(err),
                "rate_limit_error" if status == 429 else "invalid_request_error",
                "rate_limit_exceeded" if status == 429 else "request_too_large",
                headers=[(k.lower().encode(), v.encode()) for k, v in err.headers.items()],
            ) from None
        except LimiterUnavailable as err:
            raise GatewayError(503, str(err), "service_unavailable", "limits_unavailable") from None

    async def _replica(
        self, call: Call, endpoint: EndpointEntry
    ) -> tuple[EndpointEntry, ReplicaEntry]:
        replica = endpoint.pick_replica()
        if replica is not None:
            return endpoint, replica
        if endpoint.status != "idle" or self.temporal is None:
            raise _Retryable("unavailable", f"endpoint {endpoint.name} has no ready replica")
        # Scale from zero: wake the endpoint and wait (bounded) for a ready replica.
        started = time.perf_counter()
        deadline = started + self.settings.wake_timeout_seconds
        await self._wake(endpoint)
        while True:
            current = self.table.endpoints.get(endpoint.id)
            if current is None:
                raise _Retryable("unavailable", f"endpoint {endpoint.name} went away", cool=False)
            replica = current.pick_replica()
            if replica is not None:
                call.waited += time.perf_counter() - started
                return current, replica
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                call.waited += time.perf_counter() - started
                raise _Retryable("wake_timeout", f"endpoint {endpoint.name} did not wake in time")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.table.changed.wait(), min(remaining, WAKE_RESEND_S))
            if time.perf_counter() - started >= WAKE_RESEND_S:
                await self._wake(current)

    async def _wake(self, endpoint: EndpointEntry) -> None:
        now = time.monotonic()
        if now - self._woken.get(endpoint.id, -WAKE_RESEND_S) < WAKE_RESEND_S:
            return
        self._woken[endpoint.id] = now
        assert self.temporal is not None
        try:
            handle = self.temporal.get_workflow_handle(endpoint_workflow_id(endpoint.id))
            await handle.signal(WAKE_SIGNAL)
            self.metrics.wakes.labels(endpoint.name).inc()
            log.info("gateway.wake.sent", endpoint=endpoint.name, endpoint_id=str(endpoint.id))
        except Exception as err:
            log.warning("gateway.wake.failed", endpoint=endpoint.name, error=str(err))

    def _upstream_body(self, call: Call, endpoint: EndpointEntry) -> bytes:
        payload = call.payload
        # Replicas serve their endpoint's name; a provider its own model id.
        model = endpoint.upstream_model or endpoint.name
        if payload.get("model") != model or (call.stream and not call.client_wants_usage):
            payload = dict(payload)
            payload["model"] = model
            if call.stream and call.kind != "embedding":
                # Usage settles the token limits; the client gets it only if it asked.
                options = dict(payload.get("stream_options") or {})
                options["include_usage"] = True
                payload["stream_options"] = options
        return json.dumps(payload).encode()

    async def _attempt(
        self, call: Call, route: RouterEntry | EndpointEntry, candidate: Candidate, send: Send
    ) -> None:
        endpoint = self.table.endpoints.get(candidate.endpoint_id)
        if endpoint is None:
            raise _Retryable("unavailable", "the endpoint is not routable", cool=False)
        reservation = await self._reserve(call, candidate)
        used: tuple[int, int] | None = None
        replica: ReplicaEntry | None = None
        try:
            endpoint, replica = await self._replica(call, endpoint)
            self._count(endpoint.id, replica.url, 1)
            try:
                used = await self._forward(call, route, candidate, endpoint, replica, send)
            finally:
                self._count(endpoint.id, replica.url, -1)
        except _Retryable:
            if reservation is not None:
                await self.limiter.release(reservation)
            raise
        except BaseException:
            if reservation is not None:
                # Unknown usage (the client went away, a broken stream): keep the reservation.
                await asyncio.shield(self.limiter.settle(reservation, reservation.tokens))
            raise
        if reservation is not None:
            actual = sum(used) if used is not None else reservation.tokens
            await self.limiter.settle(reservation, actual)

    def _count(self, endpoint_id: uuid.UUID, url: str, delta: int) -> None:
        """Requests in flight, on the table's current entries (a reload while a request
        runs replaces them and carries the counts over)."""
        entry = self.table.endpoints.get(endpoint_id)
        if entry is None:
            return
        entry.in_flight += delta
        for replica in entry.replicas:
            if replica.url == url:
                replica.in_flight += delta
                return

    async def _forward(
        self,
        call: Call,
        route: RouterEntry | EndpointEntry,
        candidate: Candidate,
        endpoint: EndpointEntry,
        replica: ReplicaEntry,
        send: Send,
    ) -> tuple[int, int] | None:
        assert self._http is not None
        body = self._upstream_body(call, endpoint)
        timeout = route.timeout_s if isinstance(route, RouterEntry) else None
        sent_at = time.perf_counter()
        request_timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=self.settings.connect_timeout_seconds
        )
        response: aiohttp.ClientResponse | None = None
        for attempt in range(2):
            try:
                response = await self._http.post(
                    replica.url + call.path,
                    data=body,
                    headers={"content-type": "application/json", **endpoint.headers},
                    timeout=request_timeout,
                )
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
                # Most likely a pooled connection the upstream had just closed (idle
                # keep-alive): once more on a new one before calling it a failure.
                if attempt == 0:
                    continue
                call.waited += time.perf_counter() - sent_at
                raise _Retryable(
                    "connect", f"{endpoint.name}: {type(err).__name__}: {err}"
                ) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                call.waited += time.perf_counter() - sent_at
                raise _Retryable(
                    "connect", f"{endpoint.name}: {type(err).__name__}: {err}"
                ) from None
        assert response is not None
        try:
            status = response.status
            if status >= 400:
                payload = await response.read()
                call.waited += time.perf_counter() - sent_at
                headers = _pass_headers(response.headers)
                if RetryPolicy().is_retryable(status):
                    raise _Retryable(
                        "status",
                        f"{endpoint.name} answered {status}",
                        status=status,
                        body=payload,
                        headers=headers,
                        retry_after_s=_retry_after(response.headers.get("retry-after")),
                    )
                await self._send_error(send, call, status, payload, headers, endpoint.name)
                return None
            if call.stream:
                return await self._relay_stream(call, candidate, endpoint, response, sent_at, send)
            payload = await response.read()
            finished = time.perf_counter()
            call.waited += finished - sent_at
        except _Retryable:
            raise
        except (aiohttp.ClientError, TimeoutError) as err:
            call.waited += time.perf_counter() - sent_at
            raise _Retryable("read", f"{endpoint.name}: {type(err).__name__}: {err}") from None
        finally:
            response.release()
        used = None
        with contextlib.suppress(ValueError):
            used = _usage_of(json.loads(payload))
        self._succeeded(call, candidate, endpoint, finished - call.arrived, used, stream=False)
        headers = self._our_headers(call, endpoint, finished) + _pass_headers(response.headers)
        await _respond(send, status, payload, headers)
        return used

    async def _relay_stream(
        self,
        call: Call,
        candidate: Candidate,
        endpoint: EndpointEntry,
        response: aiohttp.ClientResponse,
        sent_at: float,
        send: Send,
    ) -> tuple[int, int] | None:
        """Pass the SSE stream on event by event. Until the first event reached the client
        a broken upstream is retryable; after it, the client gets an error event."""
        started = False
        used: tuple[int, int] | None = None
        first_at = 0.0
        try:
            async for event in _events(response.content):
                if not started:
                    first_at = time.perf_counter()
                    call.waited += first_at - sent_at
                    headers = self._our_headers(call, endpoint, first_at)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": response.status,
                            "headers": SSE_HEADERS + headers,
                        }
                    )
                    started = True
                if b'"usage"' in event:
                    found = _event_usage(event)
                    if found is not None:
                        used = found
                        if not call.client_wants_usage and _only_usage(event):
                            continue
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
            if not started:
                call.waited += time.perf_counter() - sent_at
                raise _Retryable("read", f"{endpoint.name}: {type(err).__name__}: {err}") from None
            # Bytes already went out: no fallback. The client sees the failure.
            self.metrics.upstream_errors.labels(call.model, endpoint.name, "stream").inc()
            error = GatewayError(502, f"the upstream stream broke: {err}", "upstream_error")
            message = b"data: " + error.body() + b"\n\n"
            await send({"type": "http.response.body", "body": message, "more_body": False})
            self._record(call, 502, endpoint, used, first_at - sent_at)
            self.metrics.requests.labels(call.model, endpoint.name, "502").inc()
            return used
        if not started:
            raise _Retryable("read", f"{endpoint.name} sent an empty stream")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        ended = time.perf_counter()
        self.metrics.ttft.labels(call.model, endpoint.name).observe(first_at - call.arrived)
        self._succeeded(
            call,
            candidate,
            endpoint,
            ended - call.arrived,
            used,
            stream=True,
            ttft=first_at - sent_at,
        )
        return used

    def _our_headers(
        self, call: Call, endpoint: EndpointEntry, now: float
    ) -> list[tuple[bytes, bytes]]:
        overhead = max(0.0, now - call.arrived - call.waited)
        self.metrics.overhead.labels(call.model).observe(overhead)
        return [
            (b"x-cp-target", endpoint.name.encode()),
            (b"x-cp-overhead-ms", f"{overhead * 1000:.3f}".encode()),
        ]

    def _succeeded(
        self,
        call: Call,
        candidate: Candidate,
        endpoint: EndpointEntry,
        seconds: float,
        used: tuple[int, int] | None,
        *,
        stream: bool,
        ttft: float | None = None,
    ) -> None:
        metrics = self.metrics
        self._record(call, 200, endpoint, used, ttft)
        metrics.requests.labels(call.model, endpoint.name, "200").inc()
        metrics.latency.labels(call.model, endpoint.name).observe(seconds)
        if used is not None:
            metrics.tokens.labels(call.model, endpoint.name, "prompt").inc(used[0])
            metrics.tokens.labels(call.model, endpoint.name, "completion").inc(used[1])
        target = candidate.target
        if target is not None and candidate.router is not None:
            now = time.monotonic()
            if stream and ttft is not None:
                self.latency.observe_ttft(target.key, ttft, now=now)
            else:
                self.latency.observe_latency(target.key, seconds, now=now)
            if used is not None:
                target.stats.tpm_used += sum(used)
            if candidate.router.cooldowns.is_cooling(target.key, now):
                return
            candidate.router.cooldowns.record_success(target.key, now)
            metrics.cooling.labels(candidate.router.name, endpoint.name).set(0)

    def _record(
        self,
        call: Call,
        status: int,
        endpoint: EndpointEntry | None,
        used: tuple[int, int] | None,
        ttft: float | None,
        *,
        target: str = "",
    ) -> None:
        """One usage record per answered request, buffered (the recorder writes batches
        in the background)."""
        if self.usage is None:
            return
        key = call.key
        self.usage.record(
            UsageEntry(
                tenant_id=key.tenant_id,
                project_id=key.project_id,
                api_key_id=key.id,
                route=call.model,
                target=endpoint.name if endpoint is not None else target,
                endpoint_id=endpoint.id if endpoint is not None and not endpoint.cloud else None,
                status=status,
                prompt_tokens=used[0] if used else 0,
                completion_tokens=used[1] if used else 0,
                latency_ms=(time.perf_counter() - call.arrived) * 1000,
                ttft_ms=ttft * 1000 if ttft is not None else None,
                stream=call.stream,
            )
        )

    async def _send_error(
        self,
        send: Send,
        call: Call,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        target: str | None = None,
    ) -> None:
        target = target or (call.tried[-1] if call.tried else "")
        self._record(call, status, None, None, None, target=target)
        self.metrics.requests.labels(call.model, target, str(status)).inc()
        ours = [(b"x-cp-target", target.encode())] if target else []
        if not any(k == b"content-type" for k, _ in headers):
            headers = headers + JSON_HEADERS
        await _respond(send, status, body, headers + ours)


def _pass_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    return [
        (name.lower().encode(), value.encode())
        for name, value in headers.items()
        if name.lower() in PASSED_HEADERS and name.lower() != "content-type"
    ] + [(b"content-type", headers.get("content-type", "application/json").encode())]


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """One SSE event at a time (each with its blank line), as soon as it is complete."""
    pending = b""
    async for chunk in content.iter_any():
        pending += chunk
        while (end := pending.find(b"\n\n")) >= 0:
            yield pending[: end + 2]
            pending = pending[end + 2 :]
    if pending.strip():
        yield pending


def _event_usage(event: bytes) -> tuple[int, int] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            with contextlib.suppress(ValueError):
                found = _usage_of(json.loads(line[6:]))
                if found is not None:
                    return found
    return None


def _only_usage(event: bytes) -> bool:
    """Whether the event is just the usage chunk asked for on the client's behalf."""
    for line in event.split(b"\n"):
        if line.startswith(b"data: {"):
            with contextlib.suppress(ValueError):
                payload = json.loads(line[6:])
                return isinstance(payload, dict) and not payload.get("choices")
    return False
