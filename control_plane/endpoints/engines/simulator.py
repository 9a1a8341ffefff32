"""An OpenAI-compatible LLM simulator that replicas run instead of a real engine.

It answers `/v1/chat/completions` and `/v1/completions` (plain JSON or SSE streaming),
`/v1/models`, `/health` and `/metrics`, and exports the vLLM metric names, so that
autoscaling, routing and benchmarks exercise the same code paths as against vLLM, on a
machine without an accelerator.

Model of an engine:

* At most `max_concurrency` sequences run at once; up to `max_queue` more wait for a
  slot (FIFO). A request arriving when the queue is full gets 429 with `Retry-After: 1`.
* A running sequence waits `ttft_ms` before its first token and `itl_ms` between
  tokens. With both at zero nothing sleeps, so the server runs as fast as it can.
* The output is `max_tokens` (or `max_completion_tokens`) tokens when the request sets
  it, capped at `max_output_tokens`, and then finishes with `length`; otherwise it is
  `output_tokens` tokens and finishes with `stop`, as if the model emitted EOS.
* A token is one word of a fixed vocabulary, drawn by a PRNG seeded from the seed and a
  hash of the prompt, so the same prompt gives the same text on every replica and run.
* Prompt tokens are counted as whitespace-separated words (token ids count one each),
  at least one per request: rough, but stable and cheap.

Run it:

    python -m control_plane.endpoints.engines.simulator --port 8000 --model sim
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_plane.endpoints.engines.openai_http import (
    DONE,
    JSON_HEADERS,
    SSE_HEADERS,
    ApiError,
    error_response,
)
from control_plane.endpoints.engines.openai_http import dumps as _dumps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Short, common words, so that generated text reads as (meaningless) English.
VOCABULARY: tuple[str, ...] = tuple(
    """the a of and to in is that it for on with as was at by be this from or an are
    have not but had his they which one you were all we her she there can been has
    more if will would when so what up out about into than them only time some could
    other then its over also new these two may first any like now my such make our way
    well even after most very just where those much through down should because each
    model server token request cluster replica latency queue metric stream answer
    simulated value""".split()
)

# Buckets sized for a simulator whose latencies are set in milliseconds: fine below
# 100 ms (TTFT, per-token time), coarse up to a minute (whole requests under load).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class SimulatorConfig:
    model: str
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    output_tokens: int = 16
    max_concurrency: int = 8
    max_queue: int = 256
    seed: int = 0
    max_output_tokens: int = 4096
    # Seconds the server answers 503 ("loading") after start, as a real engine does
    # while it loads weights: start-up, readiness and scale-out timings become realistic.
    load_time_s: float = 0.0
    # Failure injection, to exercise what sits in front (retries, cooldowns, fallbacks):
    # this share of requests is answered `fail_status` (with `Retry-After:
    # fail_retry_after_s` on a 429), drawn from a generator seeded with `seed`; and with
    # `fail_mid_stream` a stream breaks off (connection dropped) after its first token.
    fail_rate: float = 0.0
    # Injection starts after this many requests (e.g. 1: the deploy's probe succeeds).
    fail_after: int = 0
    fail_status: int = 500
    fail_retry_after_s: int = 1
    fail_mid_stream: bool = False


def _error(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    return error_response(error, headers)


@dataclass(frozen=True)
class _Job:
    """A validated request: everything generation needs, nothing else."""

    chat: bool
    prompt_text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool


def _count_words(text: str) -> int:
    return len(text.split())


def _message_text(messages: Any) -> tuple[str, int]:
    """Text to seed generation with (roles included), and the prompt token count."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    parts: list[str] = []
    tokens = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a string 'role'", param="messages")
        content = message.get("content")
        parts.append(message["role"])
        if isinstance(content, str):
            parts.append(content)
            tokens += _count_words(content)
        elif isinstance(content, list):
            # Multimodal content: only the text parts carry prompt tokens here.
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                    tokens += _count_words(part["text"])
        elif content is not None:
            raise ApiError(400, "message 'content' must be a string or array", param="messages")
    return "\n".join(parts), tokens


def _prompt(prompt: Any) -> tuple[str, int]:
    """Text to seed generation with, and its token count."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, _count_words(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    raise ApiError(
        400,
        "'prompt' must be a string, an array of token ids, or an array holding one of those",
        param="prompt",
    )


class Simulator:
    """The engine: admission (slots and queue), generation, and metrics."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self._failures = random.Random(config.seed)
        self._answered = 0
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._waiting = 0
        self._running = 0
        self._created = int(time.time())
        labels = ["model_name"]
        name = config.model
        self.running = Gauge(
            "vllm:num_requests_running",
            "Requests generating tokens.",
            labels,
            registry=self.registry,
        ).labels(name)
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests queued for a slot.",
            labels,
            registry=self.registry,
        ).labels(name)
        # Autoscalers also read the KV cache fill; here it is the share of busy slots.
        kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of sequence slots in use (1 = full).",
            labels,
            registry=self.registry,
        ).labels(name)
        kv_usage.set_function(lambda: self._running / config.max_concurrency)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens processed.",
            labels,
            registry=self.registry,
        ).labels(name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Tokens generated.",
            labels,
            registry=self.registry,
        ).labels(name)
        success = Counter(
            "vllm:request_success",
            "Finished requests, by why they finished.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.success = {
            reason: success.labels(name, reason) for reason in ("stop", "length", "abort")
        }
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "From arrival (queueing included) to the first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "From arrival to the last token.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(name)
        # One observation per request (its mean inter-token time), not one per token:
        # the same distribution for fixed itl, at a fraction of the cost per request.
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        ).labels(name)

    # -- admission --------------------------------------------------------------------

    async def acquire(self) -> None:
        """Take a slot, queueing for one if needed; ApiError(429) when the queue is full."""
        slots = self._slots
        if slots.locked() or self._waiting:
            if self._waiting >= self.config.max_queue:
                raise ApiError(
                    429,
                    "The server is at capacity; retry shortly.",
                    type_="rate_limit_error",
                    code="rate_limit_exceeded",
                )
            self._waiting += 1
            self.waiting.inc()
            try:
                await slots.acquire()
            finally:
                self._waiting -= 1
                self.waiting.dec()
        else:
            # Not locked: acquire() returns without suspending, so no waiter can interleave.
            await slots.acquire()
        self._running += 1
        self.running.inc()

    def injected_failure(self) -> ApiError | None:
        rate = self.config.fail_rate
        self._answered += 1
        if rate <= 0 or self._answered <= self.config.fail_after:
            return None
        if rate < 1 and self._failures.random() >= rate:
            return None
        status = self.config.fail_status
        if status == 429:
            return ApiError(429, "injected rate limit", "rate_limit_error", code="rate_limited")
        return ApiError(status, "injected failure", "server_error")

    def release(self) -> None:
        self._running -= 1
        self.running.dec()
        self._slots.release()

    # -- generation -------------------------------------------------------------------

    def tokens(self, job: _Job) -> list[str]:
        seed = zlib.crc32(job.prompt_text.encode(), self.config.seed & 0xFFFFFFFF)
        words = random.Random(seed).choices(VOCABULARY, k=job.output_tokens)
        return [words[0], *(" " + word for word in words[1:])] if words else []

    def parse(self, body: bytes, chat: bool) -> _Job:
        try:
            request = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"Request body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise ApiError(400, "Request body must be a JSON object")
        model = request.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model != self.config.model:
            raise ApiError(
                404,
                f"The model '{model}' does not exist",
                param="model",
                code="model_not_found",
            )
        if chat:
            text, prompt_tokens = _message_text(request.get("messages"))
        else:
            text, prompt_tokens = _prompt(request.get("prompt"))
        limit = request.get("max_completion_tokens") if chat else None
        if limit is None:
            limit = request.get("max_tokens")
        if limit is None:
            output_tokens, reason = self.config.output_tokens, "stop"
        elif type(limit) is int and limit >= 1:
            output_tokens, reason = min(limit, self.config.max_output_tokens), "length"
        else:
            raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        n = request.get("n", 1)
        if n not in (1, None):
            raise ApiError(400, "the simulator generates one choice per request", param="n")
        stream = request.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        options = request.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        return _Job(
            chat=chat,
            prompt_text=text,
            prompt_tokens=max(prompt_tokens, 1),
            output_tokens=output_tokens,
            finish_reason=reason,
            stream=bool(stream),
            include_usage=bool(options and options.get("include_usage")),
        )

    def usage(self, job: _Job, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens,
        }

    def finish(self, job: _Job, arrived: float, first: float, tokens: int, reason: str) -> None:
        done = time.perf_counter()
        self.prompt_tokens.inc(job.prompt_tokens)
        self.generation_tokens.inc(tokens)
        self.success[reason].inc()
        self.e2e.observe(done - arrived)
        if tokens:
            self.ttft.observe(first - arrived)
        if tokens > 1:
            self.tpot.observe((done - first) / (tokens - 1))

    async def complete(self, job: _Job, arrived: float) -> bytes:
        """Run a whole non-streaming request (slot already held) and return its body."""
        config = self.config
        tokens = self.tokens(job)
        if config.ttft_ms:
            await asyncio.sleep(config.ttft_ms / 1000)
        first = time.perf_counter()
        # One sleep for all the remaining tokens: nobody sees them one by one.
        if config.itl_ms and len(tokens) > 1:
            await asyncio.sleep(config.itl_ms * (len(tokens) - 1) / 1000)
        self.finish(job, arrived, first, len(tokens), job.finish_reason)
        text = "".join(tokens)
        if job.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": job.finish_reason,
            }
            kind, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": job.finish_reason,
            }
            kind, prefix = "text_completion", "cmpl-"
        return _dumps(
            {
                "id": prefix + uuid.uuid4().hex,
                "object": kind,
                "created": int(time.time()),
                "model": config.model,
                "choices": [choice],
                "usage": self.usage(job, len(tokens)),
            }
        )


class _EventStream:
    """The SSE response of a streaming request. It owns the request's slot from the
    moment it is built, and frees it however the response ends (even if it never starts
    sending), which Starlette's StreamingResponse would not guarantee."""

    def __init__(self, simulator: Simulator, job: _Job, arrived: float) -> None:
        self.simulator = simulator
        self.job = job
        self.arrived = arrived

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._stream(send, disconnected)
        finally:
            watcher.cancel()
            self.simulator.release()

    async def _stream(self, send: Send, disconnected: asyncio.Event) -> None:
        simulator, job = self.simulator, self.job
        config = simulator.config
        chat = job.chat
        base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": config.model,
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "type": "http.response.body",
                "body": b"data: " + _dumps({**base, "choices": choices, **extra}) + b"\n\n",
                "more_body": True,
            }

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        tokens = simulator.tokens(job)
        ttft, itl = config.ttft_ms / 1000, config.itl_ms / 1000
        if chat:
            # OpenAI opens a chat stream with the role and empty content.
            await send(event([choice("", None, role=True)]))
        first = time.perf_counter()
        sent = 0
        reason = job.finish_reason
        for index, token in enumerate(tokens):
            delay = ttft if index == 0 else itl
            if delay:
                await asyncio.sleep(delay)
            if disconnected.is_set():
                reason = "abort"
                break
            if index == 0:
                first = time.perf_counter()
            last = index == len(tokens) - 1
            await send(event([choice(token, reason if last else None)]))
            sent += 1
            if config.fail_mid_stream:
                # The server drops the connection: the client sees a truncated stream.
                raise ConnectionAbortedError("injected failure in the middle of a stream")
        simulator.finish(job, self.arrived, first, sent, reason)
        if reason == "abort":
            return
        if not tokens:
            await send(event([choice(None if chat else "", reason)]))
        if job.include_usage:
            await send(event([], usage=simulator.usage(job, sent)))
        await send({"type": "http.response.body", "body": DONE, "more_body": False})


def create_app(config: SimulatorConfig) -> Starlette:
    simulator = Simulator(config)
    loaded_at = time.monotonic() + config.load_time_s

    def loading() -> bool:
        return config.load_time_s > 0 and time.monotonic() < loaded_at

    async def generate(request: Request, chat: bool) -> Response | _EventStream:
        arrived = time.perf_counter()
        if loading():
            error = ApiError(503, "the model is still loading", "service_unavailable")
            return _error(error, {"retry-after": "1"})
        try:
            job = simulator.parse(await request.body(), chat)
            failure = simulator.injected_failure()
            if failure is not None:
                retry = str(config.fail_retry_after_s) if failure.status == 429 else None
                return _error(failure, {"retry-after": retry} if retry else None)
            await simulator.acquire()
        except ApiError as error:
            return _error(error, {"retry-after": "1"} if error.status == 429 else None)
        if job.stream:
            return _EventStream(simulator, job, arrived)
        try:
            body = await simulator.complete(job, arrived)
        finally:
            simulator.release()
        return Response(body, 200, JSON_HEADERS)

    async def chat_completions(request: Request) -> Response | _EventStream:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response | _EventStream:
        return await generate(request, chat=False)

    models_body = _dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": config.model,
                    "object": "model",
                    "created": simulator._created,
                    "owned_by": "control-plane-simulator",
                    "max_model_len": config.max_output_tokens,
                }
            ],
        }
    )

    async def models(request: Request) -> Response:
        return Response(models_body, 200, JSON_HEADERS)

    async def health(request: Request) -> Response:
        return Response(b"", 503 if loading() else 200)

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(simulator.registry), 200, {"content-type": CONTENT_TYPE_LATEST}
        )

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
    app.state.simulator = simulator
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--max-output-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--load-time-s", type=float, default=0.0, help="answer 503 for this long after start"
    )
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of requests failed")
    parser.add_argument("--fail-after", type=int, default=0, help="requests before failing")
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--fail-retry-after-s", type=int, default=1)
    parser.add_argument("--fail-mid-stream", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = _parser().parse_args(argv)
    if args.max_concurrency < 1 or args.max_queue < 0 or args.output_tokens < 0:
        raise SystemExit("--max-concurrency must be >= 1, --max-queue and --output-tokens >= 0")
    if args.ttft_ms < 0 or args.itl_ms < 0 or args.load_time_s < 0:
        raise SystemExit("--ttft-ms, --itl-ms and --load-time-s must be >= 0")
    if not 0 <= args.fail_rate <= 1 or not 400 <= args.fail_status <= 599:
        raise SystemExit("--fail-rate must be in [0, 1] and --fail-status in [400, 599]")
    config = SimulatorConfig(
        model=args.model,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        output_tokens=args.output_tokens,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        seed=args.seed,
        max_output_tokens=args.max_output_tokens,
        load_time_s=args.load_time_s,
        fail_rate=args.fail_rate,
        fail_after=args.fail_after,
        fail_status=args.fail_status,
        fail_retry_after_s=args.fail_retry_after_s,
        fail_mid_stream=args.fail_mid_stream,
    )
    # "auto" takes uvloop and httptools when installed (they are, via uvicorn[standard])
    # and falls back to asyncio and h11 otherwise.
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="auto",
        http="auto",
        lifespan="off",
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
