"""An OpenAI-compatible embeddings server: a sentence-transformers model on the CPU.

It answers `POST /v1/embeddings`, `GET /v1/models`, `/health` and `/metrics`, and exports
`vllm:num_requests_running` / `vllm:num_requests_waiting`, so that autoscaling reads it
as it reads the other engines.

* The model loads in a background thread at startup: `/health` answers 503 until it has
  loaded and embedded one warm-up input, then 200. If loading fails the process exits
  non-zero, so the replica counts as failed instead of never turning healthy.
* Concurrent requests are batched: the batcher takes the first waiting request, then
  gathers more for up to `max_batch_wait_ms` or until `max_batch_size` inputs, and runs
  one `model.encode` for them all in a worker thread, so the event loop stays free.
  A single request larger than the batch is encoded alone, in chunks of the batch size.
* `encoding_format` is `float` (default) or `base64` (little-endian float32, as OpenAI
  sends it); `dimensions` truncates and renormalises, up to the model's dimension.
* Usage counts the tokens the model saw: its own tokenizer, special tokens included,
  truncated at the model's maximum sequence length.

Run it:

    python -m control_plane.endpoints.engines.embeddings_server --port 8000 \\
        --model-dir /models/all-MiniLM-L6-v2 --served-model-name minilm
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
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
    JSON_HEADERS,
    ApiError,
    error_response,
    serve_loading_app,
)
from control_plane.endpoints.engines.openai_http import dumps as _dumps

logger = get_logger(__name__)

Vectors = npt.NDArray[np.float32]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingsConfig:
    model_dir: str
    served_model_name: str
    max_batch_size: int = 64
    max_batch_wait_ms: float = 5.0
    max_input_items: int = 2048
    # Torch intra-op threads; None leaves torch's default (one per core it sees).
    threads: int | None = None


class EncodeFailed(Exception):
    """The model failed on a batch this request was in (logged once, by the batcher)."""


def _error(error: ApiError) -> Response:
    return error_response(error, {"retry-after": "1"} if error.status == 503 else None)


class Encoder(Protocol):
    """What the server needs of a model: its dimension and a blocking batch encode."""

    @property
    def dimension(self) -> int: ...

    def encode(self, texts: list[str]) -> tuple[Vectors, list[int]]:
        """Embeddings (one row per text) and each text's token count."""
        ...


class SentenceTransformerEncoder:
    """A sentence-transformers model, loaded from a local directory onto the CPU."""

    def __init__(self, model_dir: str, batch_size: int, threads: int | None) -> None:
        # Imported here, not at the top: importing them takes seconds, and the module
        # must stay cheap to import. Through importlib so that mypy does not analyse
        # all of torch and transformers (about 20 s more on every cold lint run).
        torch = importlib.import_module("torch")
        transformers_logging = importlib.import_module("transformers.utils.logging")
        sentence_transformers = importlib.import_module("sentence_transformers")
        if threads is not None:
            torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()
        self._model = sentence_transformers.SentenceTransformer(
            model_dir, device="cpu", local_files_only=True
        )
        self._model.eval()
        self._batch_size = batch_size
        self._max_length: int | None = self._model.max_seq_length
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            dimension = self.encode(["dimension"])[0].shape[1]
        self._dimension = int(dimension)

    @property
    def dimension(self) -> int:
        return self._dimension

    def encode(self, texts: list[str]) -> tuple[Vectors, list[int]]:
        vectors = self._model.encode(
            texts,
            batch_size=self._batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        tokenizer = self._model.tokenizer
        if self._max_length:
            ids = tokenizer(texts, truncation=True, max_length=self._max_length)["input_ids"]
        else:
            ids = tokenizer(texts)["input_ids"]
        return np.asarray(vectors, dtype=np.float32), [len(i) for i in ids]


@dataclass
class _Pending:
    """One request's texts, waiting for the batcher to resolve its future."""

    texts: list[str]
    future: asyncio.Future[tuple[Vectors, list[int]]]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _Job:
    """A validated request."""

    texts: list[str]
    encoding_format: str
    dimensions: int | None


class Embedder:
    """Loading, batching and metrics around one encoder."""

    def __init__(
        self,
        config: EmbeddingsConfig,
        load: Callable[[EmbeddingsConfig], Encoder] | None = None,
    ) -> None:
        self.config = config
        self._load = load or _load_sentence_transformer
        self.encoder: Encoder | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._loaded = threading.Event()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._batcher: asyncio.Task[None] | None = None
        # One encode at a time: torch already spreads each one over its threads.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embeddings-encode")
        self._created = int(time.time())

        self.registry = CollectorRegistry()
        labels = ["model_name"]
        name = config.served_model_name
        self.running = Gauge(
            "vllm:num_requests_running",
            "Requests whose inputs are being embedded.",
            labels,
            registry=self.registry,
        ).labels(name)
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests waiting for a batch.",
            labels,
            registry=self.registry,
        ).labels(name)
        self._requests = Counter(
            "embeddings_requests",
            "Embedding requests answered, by HTTP status.",
            [*labels, "status"],
            registry=self.registry,
        )
        self.inputs = Counter(
            "embeddings_inputs",
            "Inputs embedded.",
            labels,
            registry=self.registry,
        ).labels(name)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Input tokens embedded.",
            labels,
            registry=self.registry,
        ).labels(name)
        self.batch_size = Histogram(
            "embeddings_batch_size",
            "Inputs per model call.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels(name)
        self.latency = Histogram(
            "embeddings_request_latency_seconds",
            "From arrival to response, queueing included.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(name)
        ready = Gauge(
            "embeddings_model_loaded",
            "1 once the model has loaded and answered a warm-up input.",
            labels,
            registry=self.registry,
        ).labels(name)
        ready.set_function(lambda: 1.0 if self.encoder is not None else 0.0)

    def count(self, status: int) -> None:
        self._requests.labels(self.config.served_model_name, str(status)).inc()

    # -- loading ------------------------------------------------------------------------

    def start_loading(self, on_failure: Callable[[], None] | None = None) -> threading.Thread:
        def run() -> None:
            started = time.perf_counter()
            try:
                encoder = self._load(self.config)
                # A warm-up input proves the model runs before /health says so.
                encoder.encode(["warm-up"])
            except Exception as exc:
                logger.exception("embeddings.load.failed", model_dir=self.config.model_dir)
                self.load_error = f"{type(exc).__name__}: {exc}"
                if on_failure is not None:
                    on_failure()
            else:
                self.load_seconds = time.perf_counter() - started
                self.encoder = encoder
                logger.info(
                    "embeddings.load.done",
                    model_dir=self.config.model_dir,
                    seconds=round(self.load_seconds, 2),
                    dimension=encoder.dimension,
                )
            finally:
                self._loaded.set()

        thread = threading.Thread(target=run, name="embeddings-load", daemon=True)
        thread.start()
        return thread

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    # -- batching -----------------------------------------------------------------------

    def start_batching(self) -> None:
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._batch_loop(), name="embeddings-batcher")

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[str]) -> tuple[Vectors, list[int]]:
        if self._queue is None:
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future[tuple[Vectors, list[int]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.waiting.inc()
        self._queue.put_nowait(_Pending(texts, future))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        limit = self.config.max_batch_size
        wait = self.config.max_batch_wait_ms / 1000
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        while True:
            first = carried or await queue.get()
            carried = None
            batch = [first]
            size = len(first.texts)
            deadline = loop.time() + wait
            while size < limit:
                timeout = deadline - loop.time()
                try:
                    if timeout > 0:
                        pending = await asyncio.wait_for(queue.get(), timeout)
                    else:
                        pending = queue.get_nowait()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if size + len(pending.texts) > limit:
                    # It would overflow this batch: it opens the next one instead.
                    carried = pending
                    break
                batch.append(pending)
                size += len(pending.texts)
            self.waiting.dec(len(batch))
            await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        # A request whose client went away is not embedded.
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        encoder = self.encoder
        assert encoder is not None
        texts = [text for pending in live for text in pending.texts]
        self.running.inc(len(live))
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                self._executor, encoder.encode, texts
            )
        except Exception as exc:
            logger.exception("embeddings.encode.failed", inputs=len(texts))
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(EncodeFailed(str(exc)))
            return
        finally:
            self.running.dec(len(live))
        self.batch_size.observe(len(texts))
        start = 0
        for pending in live:
            end = start + len(pending.texts)
            if not pending.future.done():
                pending.future.set_result((vectors[start:end], tokens[start:end]))
            start = end

    # -- requests -----------------------------------------------------------------------

    def parse(self, body: bytes, dimension: int) -> _Job:
        """The request's job; `dimension` is the model's."""
        try:
            request = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"Request body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise ApiError(400, "Request body must be a JSON object")
        model = request.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model != self.config.served_model_name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist",
                type_="not_found_error",
                param="model",
                code="model_not_found",
            )
        texts = self._texts(request.get("input"))
        encoding_format = request.get("encoding_format")
        if encoding_format is None:
            encoding_format = "float"
        if encoding_format not in ENCODING_FORMATS:
            raise ApiError(
                400,
                "'encoding_format' must be 'float' or 'base64'",
                param="encoding_format",
            )
        dimensions = request.get("dimensions")
        if dimensions is not None and (
            type(dimensions) is not int or not 1 <= dimensions <= dimension
        ):
            raise ApiError(
                400, f"'dimensions' must be an integer from 1 to {dimension}", param="dimensions"
            )
        return _Job(texts, encoding_format, dimensions)

    def _texts(self, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ApiError(
                400, "'input' must be a non-empty string or array of strings", param="input"
            )
        if not all(isinstance(item, str) for item in value):
            if all(type(item) is int or isinstance(item, list) for item in value):
                raise ApiError(
                    400,
                    "token id inputs are not supported by this server; send text",
                    param="input",
                )
            raise ApiError(400, "'input' must be a string or an array of strings", param="input")
        if len(value) > self.config.max_input_items:
            raise ApiError(
                400,
                f"'input' has {len(value)} items; at most {self.config.max_input_items} "
                "are allowed per request",
                param="input",
            )
        if any(not item for item in value):
            raise ApiError(400, "'input' must not contain empty strings", param="input")
        return value

    def response(self, job: _Job, vectors: Vectors, tokens: list[int]) -> bytes:
        if job.dimensions is not None and job.dimensions < vectors.shape[1]:
            vectors = vectors[:, : job.dimensions]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)
        data: list[dict[str, Any]] = []
        if job.encoding_format == "base64":
            little_endian = vectors.astype("<f4", copy=False)
            for index, row in enumerate(little_endian):
                encoded = base64.b64encode(row.tobytes()).decode()
                data.append({"object": "embedding", "index": index, "embedding": encoded})
        else:
            for index, values in enumerate(vectors.tolist()):
                data.append({"object": "embedding", "index": index, "embedding": values})
        prompt_tokens = sum(tokens)
        return _dumps(
            {
                "object": "list",
                "data": data,
                "model": self.config.served_model_name,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )


def _load_sentence_transformer(config: EmbeddingsConfig) -> Encoder:
    return SentenceTransformerEncoder(config.model_dir, config.max_batch_size, config.threads)


def create_app(
    config: EmbeddingsConfig,
    load: Callable[[EmbeddingsConfig], Encoder] | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> Starlette:
    embedder = Embedder(config, load)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        embedder.start_batching()
        embedder.start_loading(on_load_failure)
        try:
            yield
        finally:
            await embedder.stop()

    async def embeddings(request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            encoder = embedder.encoder
            if encoder is None:
                raise ApiError(
                    503, "The model is still loading; retry shortly.", type_="server_error"
                )
            job = embedder.parse(await request.body(), encoder.dimension)
            vectors, tokens = await embedder.embed(job.texts)
            body = await asyncio.get_running_loop().run_in_executor(
                None, embedder.response, job, vectors, tokens
            )
        except ApiError as error:
            embedder.count(error.status)
            return _error(error)
        except Exception as exc:
            if not isinstance(exc, EncodeFailed):
                logger.exception("embeddings.request.failed")
            embedder.count(500)
            # No internals in the body: they are in the log.
            return _error(ApiError(500, "The server failed to embed the input.", "server_error"))
        embedder.count(200)
        embedder.inputs.inc(len(job.texts))
        embedder.prompt_tokens.inc(sum(tokens))
        embedder.latency.observe(time.perf_counter() - arrived)
        return Response(body, 200, JSON_HEADERS)

    async def models(request: Request) -> Response:
        model: dict[str, Any] = {
            "id": config.served_model_name,
            "object": "model",
            "created": embedder._created,
            "owned_by": "control-plane",
        }
        if embedder.encoder is not None:
            model["dimensions"] = embedder.encoder.dimension
        return Response(_dumps({"object": "list", "data": [model]}), 200, JSON_HEADERS)

    async def health(request: Request) -> Response:
        if embedder.encoder is not None:
            return Response(_dumps({"status": "ok"}), 200, JSON_HEADERS)
        if embedder.load_error is not None:
            body = {"status": "failed", "error": embedder.load_error}
        else:
            body = {"status": "loading"}
        return Response(_dumps(body), 503, JSON_HEADERS)

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(embedder.registry), 200, {"content-type": CONTENT_TYPE_LATEST}
        )

    app = Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.embedder = embedder
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-dir", required=True, help="a sentence-transformers model")
    parser.add_argument("--served-model-name", required=True, help="the name clients send")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-input-items", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json-logs", action="store_true", help="log JSON lines")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.max_batch_size < 1 or args.max_input_items < 1:
        raise SystemExit("--max-batch-size and --max-input-items must be >= 1")
    if args.max_batch_wait_ms < 0:
        raise SystemExit("--max-batch-wait-ms must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    configure_logging(level="info", json=args.json_logs)
    config = EmbeddingsConfig(
        model_dir=args.model_dir,
        served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_input_items=args.max_input_items,
        threads=args.threads,
    )
    app = serve_loading_app(
        lambda stop: create_app(config, on_load_failure=stop), args.host, args.port
    )
    embedder: Embedder = app.state.embedder
    if embedder.load_error is not None:
        raise SystemExit(f"could not load the model from {config.model_dir}: {embedder.load_error}")


if __name__ == "__main__":
    main()
