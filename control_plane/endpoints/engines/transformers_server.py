"""An OpenAI-compatible chat and completions server: a `transformers` causal LM on the CPU.

It answers `POST /v1/chat/completions` and `POST /v1/completions` (plain JSON or SSE
streaming), `GET /v1/models`, `/health` and `/metrics`, and exports the vLLM metric
names (`vllm:num_requests_running`, `vllm:num_requests_waiting`, token counters, TTFT),
so that autoscaling and dashboards read it as they read vLLM.

* The model is a checkpoint directory or a GGUF file in it (`--gguf-file`, by default the
  only `.gguf` file at the directory's top), which `transformers` dequantizes on load.
  It loads in a background thread: `/health` answers 503 until it has loaded and
  generated one warm-up token, then 200. If loading fails the process exits non-zero.
* At most `max_concurrency` sequences generate at once (one by default: on a CPU a second
  one only shares the same cores); up to `max_queue` more wait for a slot, FIFO, and a
  request arriving when the queue is full gets 429. Generation runs in worker threads,
  one token at a time, so the event loop stays free and a client that goes away stops
  its generation at the next token.
* Chat prompts go through the model's chat template; completion prompts are text (or
  token ids) tokenized with the model's special tokens. Usage counts those prompt tokens
  and every generated token, the end-of-sequence token included.
* Sampling: `temperature` 0 is greedy, otherwise the softmax at that temperature cut to
  the `top_p` nucleus, drawn from a generator seeded with `seed` when set (the same
  request then gives the same text). `stop` strings end the text before them.
  `finish_reason` is `stop` (end of sequence or a stop string) or `length`.

Run it:

    python -m control_plane.endpoints.engines.transformers_server --port 8000 \\
        --model-dir /models/smollm2 --served-model-name smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

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

from control_plane.core.logging import configure_logging, get_logger
from control_plane.endpoints.engines.openai_http import (
    DONE,
    JSON_HEADERS,
    SSE_HEADERS,
    ApiError,
    error_response,
    serve_loading_app,
)
from control_plane.endpoints.engines.openai_http import dumps as _dumps
from control_plane.endpoints.engines.openai_http import error_body as _error_body

logger = get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DTYPES = ("float32", "bfloat16")
MAX_STOP_STRINGS = 16
# CPU generation is slow: first tokens in tenths of a second to tens of seconds, whole
# requests (and queueing behind them) in minutes.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class TransformersConfig:
    model_dir: str
    served_model_name: str
    # Relative to `model_dir`; None: see `resolve_gguf_file`.
    gguf_file: str | None = None
    dtype: str = "float32"
    # Torch intra-op threads; None leaves torch's default (one per core it sees).
    threads: int | None = None
    max_concurrency: int = 1
    max_queue: int = 16
    # Output tokens of a request that sets no `max_tokens`, and the most it may set.
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    # Prompt plus output; None: the model's own limit (`max_position_embeddings`).
    max_model_len: int | None = None


def _error(error: ApiError) -> Response:
    return error_response(error, {"retry-after": "1"} if error.status in (429, 503) else None)


def resolve_gguf_file(model_dir: str, gguf_file: str | None) -> str | None:
    """The GGUF file to load (relative to `model_dir`), or None to load the directory as
    a checkpoint: the named file, else the only `.gguf` file at the directory's top."""
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(model_dir, gguf_file)):
            raise FileNotFoundError(f"no file {gguf_file!r} in {model_dir}")
        return gguf_file
    found = sorted(name for name in os.listdir(model_dir) if name.lower().endswith(".gguf"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1 and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(
            f"{model_dir} holds {len(found)} .gguf files and no config.json; "
            "name the one to serve with --gguf-file"
        )
    return None


# -- generation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    # 0: greedy.
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """How a generation ended."""

    completion_tokens: int
    # `stop`, `length`, or `abort` (the client went away).
    finish_reason: str
    # `time.perf_counter()` when the first token was generated; None if none was.
    first_token_at: float | None


class TextStream:
    """Turns generated token ids into text deltas for `emit`.

    The whole output is decoded after each token (a token may complete a character that
    earlier ones began), and only text that can no longer change is emitted: an
    incomplete character (decoded as U+FFFD) and any tail that could be the start of a
    stop string are held back. The text ends before the first stop string."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: tuple[str, ...],
        emit: Callable[[str], None],
    ) -> None:
        self._decode = decode
        self._stop = stop
        self._emit = emit
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False

    def add(self, token: int) -> bool:
        """Take one token; True when a stop string has ended the text."""
        self._ids.append(token)
        text = self._decode(self._ids)
        cuts = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if cuts:
            self._text = text[: min(cuts)]
            self._send(len(self._text))
            self.stopped = True
            return True
        self._text = text
        end = len(text.rstrip("\ufffd"))
        self._send(end - self._stop_prefix(text[:end]))
        return False

    def finish(self) -> None:
        """Emit what was held back: generation ended without a stop string."""
        if not self.stopped:
            self._send(len(self._text))

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of `text` that begins a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _send(self, end: int) -> None:
        if end > self._sent:
            self._emit(self._text[self._sent : end])
            self._sent = end


class LanguageModel(Protocol):
    """What the server needs of a model: tokenizing prompts and blocking generation."""

    @property
    def context_length(self) -> int | None: ...

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation through the chat template, ready for the
        assistant's turn; ApiError(400) when the model has no template or it refuses."""
        ...

    def text_prompt(self, prompt: str) -> list[int]: ...

    def check_ids(self, ids: list[int]) -> None:
        """ApiError(400) unless every id is in the vocabulary."""
        ...

    def generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Outcome:
        """Generate, passing text to `emit` as it becomes final, until the end of
        sequence, a stop string, `sampling.max_tokens`, or `cancelled` is set."""
        ...


class TransformersModel:
    """A causal LM and its tokenizer, loaded from a local directory onto the CPU."""

    def __init__(self, config: TransformersConfig) -> None:
        # Imported here, not at the top: importing them takes seconds, and the module
        # must stay cheap to import. Through importlib so that mypy does not analyse
        # all of torch and transformers.
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
        importlib.import_module("transformers.utils.logging").disable_progress_bar()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self._torch = torch
        self._template_error: type[Exception] = importlib.import_module("jinja2").TemplateError
        gguf_file = resolve_gguf_file(config.model_dir, config.gguf_file)
        options: dict[str, Any] = {"local_files_only": True}
        if gguf_file is not None:
            options["gguf_file"] = gguf_file
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(config.model_dir, **options)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            config.model_dir, dtype=getattr(torch, config.dtype), **options
        )
        model.eval()
        self._model = model
        # What the model can embed, which the tokenizer's own count may not match.
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = frozenset(eos_ids)
        pad = model.generation_config.pad_token_id
        self._pad = pad if pad is not None else min(self._eos, default=0)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        known = [n for n in (config.max_model_len, limit) if isinstance(n, int) and n > 0]
        self._context_length = min(known) if known else None

    @property
    def context_length(self) -> int | None:
        return self._context_length

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self._tokenizer.chat_template:
            raise ApiError(
                400,
                "This model has no chat template; use /v1/completions with a prompt instead",
                param="messages",
            )
        try:
            ids = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except (ValueError, TypeError, self._template_error) as exc:
            # The template's own checks ("roles must alternate user/assistant").
            raise ApiError(
                400, f"The chat template refused the messages: {exc}", param="messages"
            ) from None
        return [int(i) for i in ids]

    def text_prompt(self, prompt: str) -> list[int]:
        return [int(i) for i in self._tokenizer(prompt)["input_ids"]]

    def check_ids(self, ids: list[int]) -> None:
        if any(not 0 <= i < self._vocab_size for i in ids):
            raise ApiError(
                400, f"token ids must be from 0 to {self._vocab_size - 1}", param="prompt"
            )

    def generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> Outcome:
        torch = self._torch
        text = TextStream(self._decode, sampling.stop, emit)
        eos = self._eos
        state: dict[str, Any] = {"tokens": 0, "reason": "length", "first": None}

        # Called by `generate` after each token with the sequence so far: the one place
        # that sees every token as it comes, and can end generation after it.
        def after_token(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            token = int(input_ids[0, -1])
            state["tokens"] += 1
            if state["first"] is None:
                state["first"] = time.perf_counter()
            stop = False
            if token in eos:
                state["reason"], stop = "stop", True
            elif text.add(token):
                state["reason"], stop = "stop", True
            elif cancelled.is_set():
                state["reason"], stop = "abort", True
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)

        processors = []
        if sampling.temperature > 0:
            processors.append(_Sampler(torch, sampling))
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            # Greedy decoding: for sampling, `_Sampler` leaves only its draw standing.
            self._model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=sampling.max_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=processors,
                stopping_criteria=[after_token],
                eos_token_id=sorted(eos) or None,
                pad_token_id=self._pad,
            )
        text.finish()
        return Outcome(state["tokens"], state["reason"], state["first"])

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


class _Sampler:
    """A logits processor that draws the next token itself, with the request's own
    generator (so a seed holds whatever else runs), and masks every other token: the
    greedy step that follows then picks the draw."""

    def __init__(self, torch: Any, sampling: Sampling) -> None:
        self._torch = torch
        self._temperature = sampling.temperature
        self._top_p = sampling.top_p
        self._generator = torch.Generator()
        if sampling.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(sampling.seed)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self._torch
        probs = torch.softmax(scores.float() / self._temperature, dim=-1)
        if self._top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            # Keep the most likely tokens up to top_p of the mass (at least one).
            outside = ordered.cumsum(dim=-1) - ordered >= self._top_p
            ordered = ordered.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
        drawn = torch.multinomial(probs, 1, generator=self._generator)
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter(-1, drawn, 0.0)


def _load_transformers(config: TransformersConfig) -> LanguageModel:
    return TransformersModel(config)


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """A validated request, its prompt tokenized."""

    chat: bool
    prompt: list[int]
    sampling: Sampling
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class _Request:
    """A request as parsed, before tokenizing."""

    chat: bool
    messages: list[dict[str, Any]] | None
    text: str | None
    ids: list[int] | None
    max_tokens: int | None
    sampling: Sampling
    stream: bool
    include_usage: bool


def _number(request: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low} to {high}", param=name)
    return float(value)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    messages: list[dict[str, Any]] = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(
                        400, "this model reads text only: send text content parts", param="messages"
                    )
                if not isinstance(part.get("text"), str):
                    raise ApiError(
                        400, "a text content part needs a string 'text'", param="messages"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, "message 'content' must be a string or array", param="messages")
        messages.append({"role": message["role"], "content": content})
    return messages


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise ApiError(
            400,
            f"'stop' must be a non-empty string or an array of at most {MAX_STOP_STRINGS}",
            param="stop",
        )
    return tuple(value)


def parse_request(body: bytes, chat: bool, served_model_name: str) -> _Request:
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ApiError(400, "Request body must be a JSON object")
    model = request.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model != served_model_name:
        raise ApiError(
            404,
            f"The model '{model}' does not exist",
            type_="not_found_error",
            param="model",
            code="model_not_found",
        )
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    ids: list[int] | None = None
    if chat:
        messages = _messages(request.get("messages"))
    else:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids = prompt
        else:
            raise ApiError(
                400,
                "'prompt' must be a string, an array of token ids, or an array holding one "
                "of those",
                param="prompt",
            )
    limit = request.get("max_completion_tokens") if chat else None
    if limit is None:
        limit = request.get("max_tokens")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    if request.get("n") not in (None, 1):
        raise ApiError(400, "only one choice per request ('n': 1) is supported", param="n")
    # Refused rather than ignored: the answer would not be what the client asked for.
    # Each with the values that ask for nothing.
    neutral: dict[str, tuple[Any, ...]] = {
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "echo": (None, False),
        "best_of": (None, 1),
        "tools": (None, []),
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
    }
    for name, values in neutral.items():
        if request.get(name) not in values:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    seed = request.get("seed")
    if seed is not None and type(seed) is not int:
        raise ApiError(400, "'seed' must be an integer", param="seed")
    stream = request.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = request.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    top_p = _number(request, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", param="top_p")
    sampling = Sampling(
        max_tokens=0,
        temperature=_number(request, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        # Seeds are any integer to clients; torch takes 64 bits.
        seed=None if seed is None else seed % 2**64,
        stop=_stop(request.get("stop")),
    )
    return _Request(
        chat=chat,
        messages=messages,
        text=text,
        ids=ids,
        max_tokens=limit,
        sampling=sampling,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
    )


class Server:
    """Loading, admission (slots and queue), generation and metrics around one model."""

    def __init__(
        self,
        config: TransformersConfig,
        load: Callable[[TransformersConfig], LanguageModel] | None = None,
    ) -> None:
        self.config = config
        self._load = load or _load_transformers
        self.model: LanguageModel | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._loaded = threading.Event()
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._running = 0
        self._generators = ThreadPoolExecutor(
            config.max_concurrency, thread_name_prefix="transformers-generate"
        )
        # Tokenizing is quick but not free; one thread keeps it off the event loop and
        # never runs the tokenizer twice at once.
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="transformers-tokenize")
        self.created = int(time.time())

        self.registry = CollectorRegistry()
        labels = ["model_name"]
        name = config.served_model_name
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
        self.success = {reason: success.labels(name, reason) for reason in FINISH_REASONS}
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "From arrival (queueing included) to the first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(name)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        ).labels(name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "From arrival to the last token.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(name)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time spent waiting for a slot.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(name)
        loaded = Gauge(
            "transformers_model_loaded",
            "1 once the model has loaded and generated a warm-up token.",
            labels,
            registry=self.registry,
        ).labels(name)
        loaded.set_function(lambda: 1.0 if self.model is not None else 0.0)

    # -- loading ------------------------------------------------------------------------

    def start_loading(self, on_failure: Callable[[], None] | None = None) -> threading.Thread:
        def run() -> None:
            started = time.perf_counter()
            try:
                model = self._load(self.config)
                # One token proves the model generates before /health says so.
                model.generate(
                    model.text_prompt("Hello"), Sampling(max_tokens=1), _ignore, threading.Event()
                )
            except Exception as exc:
                logger.exception("transformers.load.failed", model_dir=self.config.model_dir)
                self.load_error = f"{type(exc).__name__}: {exc}"
                if on_failure is not None:
                    on_failure()
            else:
                self.load_seconds = time.perf_counter() - started
                self.model = model
                logger.info(
                    "transformers.load.done",
                    model_dir=self.config.model_dir,
                    seconds=round(self.load_seconds, 2),
                    context_length=model.context_length,
                )
            finally:
                self._loaded.set()

        thread = threading.Thread(target=run, name="transformers-load", daemon=True)
        thread.start()
        return thread

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def stop(self) -> None:
        self._generators.shutdown(wait=False, cancel_futures=True)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # -- admission ----------------------------------------------------------------------

    async def acquire(self) -> float:
        """Take a slot, queueing for one if needed; ApiError(429) when the queue is full.
        Returns the seconds spent queueing."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrency)
        slots = self._slots
        queued = time.perf_counter()
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
        return time.perf_counter() - queued

    def release(self) -> None:
        assert self._slots is not None
        self._running -= 1
        self.running.dec()
        self._slots.release()

    # -- requests -----------------------------------------------------------------------

    async def prepare(self, model: LanguageModel, request: _Request) -> _Job:
        """Tokenize the prompt and settle the output length within the context."""
        loop = asyncio.get_running_loop()
        if request.messages is not None:
            prompt = await loop.run_in_executor(
                self._tokenizer, model.chat_prompt, request.messages
            )
        elif request.text is not None:
            prompt = await loop.run_in_executor(self._tokenizer, model.text_prompt, request.text)
        else:
            assert request.ids is not None
            model.check_ids(request.ids)
            prompt = request.ids
        if not prompt:
            raise ApiError(400, "The prompt is empty", param="prompt")
        limit = self.config.max_tokens_limit
        if request.max_tokens is not None and request.max_tokens > limit:
            raise ApiError(
                400, f"'max_tokens' is {request.max_tokens}; at most {limit}", param="max_tokens"
            )
        context = model.context_length
        if context is not None and len(prompt) >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{len(prompt)}",
                param="messages" if request.chat else "prompt",
            )
        if request.max_tokens is not None:
            max_tokens = request.max_tokens
            if context is not None and len(prompt) + max_tokens > context:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {context} tokens; the prompt "
                    f"has {len(prompt)} and 'max_tokens' asks for {max_tokens} more",
                    param="max_tokens",
                )
        else:
            max_tokens = self.config.default_max_tokens
            if context is not None:
                max_tokens = min(max_tokens, context - len(prompt))
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            seed=request.sampling.seed,
            stop=request.sampling.stop,
        )
        return _Job(request.chat, prompt, sampling, request.stream, request.include_usage)

    async def generate(
        self,
        model: LanguageModel,
        job: _Job,
        on_text: Callable[[str], Awaitable[None]],
        cancelled: threading.Event,
    ) -> Outcome:
        """Run the job in a generation thread, awaiting `on_text` for each piece of text.
        Returns only once the thread has finished, whatever happens."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def work() -> Outcome:
            try:
                return model.generate(job.prompt, job.sampling, emit, cancelled)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        future = loop.run_in_executor(self._generators, work)
        try:
            while (text := await pieces.get()) is not None:
                await on_text(text)
        except BaseException:
            # The consumer failed (or was cancelled): stop the thread at its next token,
            # and wait for it, so that the slot is freed only then.
            cancelled.set()
            await asyncio.wait({future})
            raise
        return await future

    def usage(self, job: _Job, outcome: Outcome) -> dict[str, int]:
        prompt = len(job.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": prompt + outcome.completion_tokens,
        }

    def record(self, job: _Job, arrived: float, outcome: Outcome) -> None:
        done = time.perf_counter()
        tokens = outcome.completion_tokens
        self.prompt_tokens.inc(len(job.prompt))
        self.generation_tokens.inc(tokens)
        self.success[outcome.finish_reason].inc()
        self.e2e.observe(done - arrived)
        first = outcome.first_token_at
        if first is not None:
            self.ttft.observe(first - arrived)
            if tokens > 1:
                self.tpot.observe((done - first) / (tokens - 1))


def _ignore(text: str) -> None:
    pass


class _Completion:
    """The response to one generation request, streamed or whole. It owns the request's
    slot from the moment it is built, and frees it once generation has ended, however
    the response ends: a client that goes away cancels generation at the next token."""

    def __init__(self, server: Server, model: LanguageModel, job: _Job, arrived: float) -> None:
        self.server = server
        self.model = model
        self.job = job
        self.arrived = arrived
        self.created = int(time.time())
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cancelled = threading.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancelled.set()

        watcher = asyncio.create_task(watch())
        try:
            if self.job.stream:
                await self._stream(send, cancelled)
            else:
                await self._whole(send, cancelled)
        finally:
            watcher.cancel()
            self.server.release()

    async def _run(
        self, on_text: Callable[[str], Awaitable[None]], cancelled: threading.Event
    ) -> Outcome:
        outcome = await self.server.generate(self.model, self.job, on_text, cancelled)
        self.server.record(self.job, self.arrived, outcome)
        return outcome

    async def _whole(self, send: Send, cancelled: threading.Event) -> None:
        pieces: list[str] = []

        async def collect(text: str) -> None:
            pieces.append(text)

        try:
            outcome = await self._run(collect, cancelled)
        except Exception:
            logger.exception("transformers.generate.failed")
            error = ApiError(500, "The server failed to generate.", "server_error")
            await _send_response(send, 500, _dumps(_error_body(error)))
            return
        text = "".join(pieces)
        if self.job.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        body = {
            "id": self.id,
            "object": "chat.completion" if self.job.chat else "text_completion",
            "created": self.created,
            "model": self.server.config.served_model_name,
            "choices": [choice],
            "usage": self.server.usage(self.job, outcome),
        }
        await _send_response(send, 200, _dumps(body))

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> Message:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.job.chat else "text_completion",
            "created": self.created,
            "model": self.server.config.served_model_name,
            "choices": choices,
            **extra,
        }
        return {
            "type": "http.response.body",
            "body": b"data: " + _dumps(chunk) + b"\n\n",
            "more_body": True,
        }

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not self.job.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def _stream(self, send: Send, cancelled: threading.Event) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        if self.job.chat:
            # OpenAI opens a chat stream with the role and empty content.
            await send(self._event([self._choice("", None, role=True)]))

        async def forward(text: str) -> None:
            await send(self._event([self._choice(text, None)]))

        try:
            outcome = await self._run(forward, cancelled)
        except Exception:
            if cancelled.is_set():
                return
            logger.exception("transformers.generate.failed")
            error = ApiError(500, "The server failed to generate.", "server_error")
            body = b"data: " + _dumps(_error_body(error)) + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
            return
        if outcome.finish_reason == "abort":
            return
        await send(
            self._event([self._choice(None if self.job.chat else "", outcome.finish_reason)])
        )
        if self.job.include_usage:
            await send(self._event([], usage=self.server.usage(self.job, outcome)))
        await send({"type": "http.response.body", "body": DONE, "more_body": False})


async def _send_response(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(
    config: TransformersConfig,
    load: Callable[[TransformersConfig], LanguageModel] | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> Starlette:
    server = Server(config, load)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.start_loading(on_load_failure)
        try:
            yield
        finally:
            server.stop()

    async def generate(request: Request, chat: bool) -> Response | _Completion:
        arrived = time.perf_counter()
        try:
            model = server.model
            if model is None:
                raise ApiError(
                    503, "The model is still loading; retry shortly.", type_="server_error"
                )
            parsed = parse_request(await request.body(), chat, config.served_model_name)
            job = await server.prepare(model, parsed)
            server.queue_time.observe(await server.acquire())
        except ApiError as error:
            return _error(error)
        return _Completion(server, model, job, arrived)

    async def chat_completions(request: Request) -> Response | _Completion:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response | _Completion:
        return await generate(request, chat=False)

    async def models(request: Request) -> Response:
        model: dict[str, Any] = {
            "id": config.served_model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "control-plane",
        }
        if server.model is not None:
            model["max_model_len"] = server.model.context_length
        return Response(_dumps({"object": "list", "data": [model]}), 200, JSON_HEADERS)

    async def health(request: Request) -> Response:
        if server.model is not None:
            return Response(_dumps({"status": "ok"}), 200, JSON_HEADERS)
        if server.load_error is not None:
            body = {"status": "failed", "error": server.load_error}
        else:
            body = {"status": "loading"}
        return Response(_dumps(body), 503, {**JSON_HEADERS, "retry-after": "1"})

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(server.registry), 200, {"content-type": CONTENT_TYPE_LATEST}
        )

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-dir", required=True, help="a checkpoint or GGUF directory")
    parser.add_argument("--served-model-name", required=True, help="the name clients send")
    parser.add_argument("--gguf-file", default=None, help="the GGUF file, relative to the dir")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--max-tokens-limit", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--json-logs", action="store_true", help="log JSON lines")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.max_concurrency < 1 or args.max_queue < 0:
        raise SystemExit("--max-concurrency must be >= 1 and --max-queue >= 0")
    if not 1 <= args.default_max_tokens <= args.max_tokens_limit:
        raise SystemExit("--default-max-tokens must be from 1 to --max-tokens-limit")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise SystemExit("--max-model-len must be >= 2")
    configure_logging(level="info", json=args.json_logs)
    config = TransformersConfig(
        model_dir=args.model_dir,
        served_model_name=args.served_model_name,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        threads=args.threads,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_model_len=args.max_model_len,
    )
    app = serve_loading_app(
        lambda stop: create_app(config, on_load_failure=stop), args.host, args.port
    )
    state: Server = app.state.server
    if state.load_error is not None:
        raise SystemExit(f"could not load the model from {config.model_dir}: {state.load_error}")


if __name__ == "__main__":
    main()
