"""The LLM simulator: OpenAI shapes, determinism, admission, and vLLM metrics, in
process over ASGI; and once as a real server process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from control_plane.devstack.services import free_port
from control_plane.endpoints.engines.simulator import SimulatorConfig, create_app

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello there world"}]}


def client_for(**overrides: Any) -> httpx.AsyncClient:
    config = SimulatorConfig(**{"model": "sim", "ttft_ms": 0, "itl_ms": 0, **overrides})
    transport = httpx.ASGITransport(app=create_app(config))
    return httpx.AsyncClient(transport=transport, base_url="http://sim")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for() as c:
        yield c


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def sse(body: str) -> list[Any]:
    events = [line[6:] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_chat_completion_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "sim"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_completion_uses_default_length_and_stops(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "sim", "prompt": "a b"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert len(body["choices"][0]["text"].split()) == 16
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 2


async def test_streaming_chat_matches_non_streaming_and_ends_with_usage(
    client: httpx.AsyncClient,
) -> None:
    whole = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})).json()
    request = {**CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse(response.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]


async def test_streaming_completion_without_usage(client: httpx.AsyncClient) -> None:
    request = {"model": "sim", "prompt": "x", "max_tokens": 3, "stream": True}
    chunks = sse((await client.post("/v1/completions", json=request)).text)
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_text_is_deterministic_for_seed_and_prompt() -> None:
    async def text(seed: int, content: str) -> str:
        async with client_for(seed=seed) as c:
            request = {"model": "sim", "messages": [{"role": "user", "content": content}]}
            body = (await c.post("/v1/chat/completions", json=request)).json()
            return str(body["choices"][0]["message"]["content"])

    assert await text(1, "hi") == await text(1, "hi")
    assert await text(1, "hi") != await text(2, "hi")
    assert await text(1, "hi") != await text(1, "bye")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_unknown_model_is_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.post(path, json={**CHAT, "prompt": "x", "model": "other"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", json.dumps({"model": "sim"}).encode()),
        ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 0}).encode()),
        ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"x": 1}]}).encode()),
        ("/v1/completions", json.dumps({"model": "sim", "prompt": 5}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x"}).encode()),
    ],
)
async def test_bad_body_is_400(client: httpx.AsyncClient, path: str, body: bytes) -> None:
    response = await client.post(path, content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["sim"]


async def test_unhealthy_and_refusing_while_loading() -> None:
    async with client_for(load_time_s=0.3) as client:
        assert (await client.get("/health")).status_code == 503
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "service_unavailable"
        await asyncio.sleep(0.35)
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_injected_failures_follow_the_rate_and_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        async with client_for(fail_rate=0.5, seed=seed) as client:
            return [
                (await client.post("/v1/chat/completions", json=CHAT)).status_code
                for _ in range(40)
            ]

    first = await statuses(1)
    assert set(first) == {200, 500}
    assert 8 <= first.count(500) <= 32
    assert await statuses(1) == first


async def test_injected_failures_start_after_the_first_requests() -> None:
    async with client_for(fail_rate=1, fail_after=2) as client:
        codes = [
            (await client.post("/v1/completions", json={"model": "sim", "prompt": "x"})).status_code
            for _ in range(4)
        ]
    assert codes == [200, 200, 500, 500]


async def test_injected_rate_limit_carries_retry_after() -> None:
    async with client_for(fail_rate=1, fail_status=429, fail_retry_after_s=7) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        # A bad body is still a 400: injection applies to valid requests only.
        assert (await client.post("/v1/chat/completions", content=b"{")).status_code == 400


async def test_full_queue_is_429_and_metrics_follow_requests() -> None:
    async with client_for(ttft_ms=300, max_concurrency=1, max_queue=0) as c:
        slow = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}))
        await asyncio.sleep(0.1)
        busy = (await c.get("/metrics")).text
        assert metric(busy, "vllm:num_requests_running", model_name="sim") == 1
        assert metric(busy, "vllm:num_requests_waiting", model_name="sim") == 0

        rejected = await c.post("/v1/chat/completions", json=CHAT)
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "rate_limit_exceeded"

        assert (await slow).status_code == 200
        done = (await c.get("/metrics")).text
        assert metric(done, "vllm:num_requests_running", model_name="sim") == 0
        assert metric(done, "vllm:prompt_tokens_total", model_name="sim") == 3
        assert metric(done, "vllm:generation_tokens_total", model_name="sim") == 2
        success = "vllm:request_success_total"
        assert metric(done, success, model_name="sim", finished_reason="length") == 1
        assert metric(done, success, model_name="sim", finished_reason="stop") == 0
        assert metric(done, "vllm:time_to_first_token_seconds_count", model_name="sim") == 1
        assert metric(done, "vllm:time_to_first_token_seconds_sum", model_name="sim") >= 0.3
        assert metric(done, "vllm:e2e_request_latency_seconds_count", model_name="sim") == 1
        assert metric(done, "vllm:time_per_output_token_seconds_count", model_name="sim") == 1


async def test_requests_beyond_concurrency_wait_in_queue() -> None:
    async with client_for(ttft_ms=200, max_concurrency=1, max_queue=1) as c:
        calls = [
            asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}))
            for _ in range(2)
        ]
        await asyncio.sleep(0.1)
        text = (await c.get("/metrics")).text
        assert metric(text, "vllm:num_requests_running", model_name="sim") == 1
        assert metric(text, "vllm:num_requests_waiting", model_name="sim") == 1
        assert metric(text, "vllm:kv_cache_usage_perc", model_name="sim") == 1
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 429
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200, 200]
        text = (await c.get("/metrics")).text
        assert metric(text, "vllm:num_requests_waiting", model_name="sim") == 0


def test_real_server_process() -> None:
    """The `python -m` entry point, spoken to over TCP. The official `openai` client is
    not installed in this environment, so this uses httpx with the same requests."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_plane.endpoints.engines.simulator",
            "--port",
            str(port),
            "--model",
            "sim",
            "--ttft-ms",
            "5",
            "--itl-ms",
            "1",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as c:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, "simulator exited"
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "simulator not healthy in 30 s"
                time.sleep(0.05)
            body = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3}).json()
            assert body["usage"]["completion_tokens"] == 3
            request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            with c.stream("POST", "/v1/chat/completions", json=request) as response:
                chunks = sse(response.read().decode())
            assert chunks[-1]["usage"]["completion_tokens"] == 16
            assert "vllm:num_requests_running" in c.get("/metrics").text
    finally:
        process.terminate()
        process.wait(10)
