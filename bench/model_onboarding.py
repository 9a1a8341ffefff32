"""How fast a safetensors repository is onboarded, against a plain `snapshot_download`.

One run: a repository of random safetensors weights (`--size-mb` MiB, sharded like the
Hub's big repositories, plus config, README and an index) is served by the stand-in Hub
of `tests.fixtures.hf`. First `huggingface_hub.snapshot_download` fetches it into an
empty cache (the baseline); then the same repository is onboarded through
`POST /api/v1/models` with the real system (embedded PostgreSQL and Redis, the Temporal
dev server, the API in a uvicorn thread, every worker pool in-process), timed from the
POST to the model's `ready`. Onboarding also scans and describes the model, so it does
more than the baseline; the phase breakdown from the workflow's progress steps shows
where the time goes. Target: onboarding >= 0.8x the baseline's MB/s.

MB/s is 10^6 bytes per second of the repository's total size. The Hub runs in its own
process: in ours it would share the GIL with both clients and mostly measure that.

    .venv/bin/python bench/model_onboarding.py --size-mb 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

# Run as a script, `bench/` is on sys.path but the repository root (for `tests`) is not.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from control_plane.cli import alembic_config  # noqa: E402
from control_plane.core import temporal  # noqa: E402
from control_plane.core.codec import payload_codec  # noqa: E402
from control_plane.core.config import Settings  # noqa: E402
from control_plane.core.db import create_engine, create_sessionmaker  # noqa: E402
from control_plane.core.logging import configure_logging  # noqa: E402
from control_plane.core.storage import create_object_store  # noqa: E402
from control_plane.credentials.crypto import load_vault  # noqa: E402
from control_plane.devstack.services import (  # noqa: E402
    EmbeddedPostgres,
    EmbeddedRedis,
    RunningService,
    TemporalDevServer,
    free_port,
    start_service,
)
from tests.fixtures.identity import IdentityFactory  # noqa: E402
from tests.fixtures.stack import ApiServer  # noqa: E402
from workers.main import build_workers  # noqa: E402
from workers.registry import WorkerResources  # noqa: E402
from workflows.queues import ALL_QUEUES  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "model_onboarding.json"
MIB = 1024 * 1024
MB = 1_000_000
REPO = "bench/onboarding"
STEPS = ("resolve", "license", "download", "scan", "metadata", "finish")
README = "---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# bench\n"
CARD = {"license": "apache-2.0", "pipeline_tag": "text-generation"}


# --- the repository ---------------------------------------------------------------------


def write_shard(path: Path, name: str, size: int, seed: int) -> None:
    """A safetensors file holding one U8 tensor of `size` random bytes, written a block
    at a time so a gigabyte never sits in memory. Random: nothing on the way can
    compress or deduplicate it."""
    header = json.dumps(
        {name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(seed)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        left = size
        while left:
            block = rng.bytes(min(8 * MIB, left))
            out.write(block)
            left -= len(block)


def build_repo(folder: Path, size_mb: int, shard_mb: int) -> dict[str, Path]:
    folder.mkdir(parents=True)
    total = size_mb * MIB
    count = max(1, -(-size_mb // shard_mb))
    files: dict[str, Path] = {}
    weight_map: dict[str, str] = {}
    for index in range(count):
        name = (
            "model.safetensors"
            if count == 1
            else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        )
        tensor = f"model.layers.{index}.weight"
        size = total // count + (1 if index < total % count else 0)
        write_shard(folder / name, tensor, size, seed=index)
        files[name] = folder / name
        weight_map[tensor] = name
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    }
    small = {"config.json": json.dumps(config), "README.md": README}
    if count > 1:
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        small["model.safetensors.index.json"] = json.dumps(index_doc)
    for name, text in small.items():
        (folder / name).write_text(text)
        files[name] = folder / name
    return files


# --- the stand-in Hub, in its own process -------------------------------------------------


def _serve_hub(files: dict[str, str], control: Connection) -> None:
    from tests.fixtures.hf import HubServer

    hub = HubServer()
    hub.add_repo(REPO, {name: Path(path) for name, path in files.items()}, card=CARD)
    hub.start()
    control.send(hub.url)
    control.recv()
    served = sum(request.bytes_sent for request in hub.requests)
    hub.stop()
    control.send(served)


class HubProcess:
    def __init__(self, files: dict[str, Path]) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(
            target=_serve_hub,
            args=({name: str(path) for name, path in files.items()}, child),
            name="hf-stand-in",
            daemon=True,
        )
        self.url = ""

    def start(self, timeout: float = 120) -> None:
        self._process.start()
        # Hashing the weights for the listing takes a few seconds per gigabyte.
        if not self._control.poll(timeout):
            raise RuntimeError("the stand-in Hub did not start")
        self.url = self._control.recv()

    def stop(self) -> int:
        """Stop the Hub; the bytes it served."""
        served = 0
        if self._process.is_alive():
            self._control.send("stop")
            if self._control.poll(30):
                served = int(self._control.recv())
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        return served


# --- the system ---------------------------------------------------------------------------


@asynccontextmanager
async def infrastructure(root: Path) -> AsyncIterator[Settings]:
    """Embedded PostgreSQL and Redis and a Temporal dev server, as the test suite runs
    them; settings for a stack using them."""
    postgres = EmbeddedPostgres(root / "pg", socket_tag=f"bpg{os.getpid()}")
    redis = EmbeddedRedis(root / "redis", socket_tag=f"brd{os.getpid()}")
    temporal_server = TemporalDevServer(None, port=free_port(), ui_port=None)
    running: list[RunningService] = []
    try:
        for service in (postgres, redis, temporal_server):
            running.append(await start_service(service.spec()))
        from alembic import command

        await asyncio.to_thread(command.upgrade, alembic_config(postgres.url()), "head")
        yield Settings(
            _env_file=None,
            environment="test",
            log_level="warning",
            data_dir=root / "data",
            database={"url": postgres.url(), "pool_size": 10},
            redis={"url": redis.url},
            temporal={"address": temporal_server.address, "task_queue_prefix": "bench-"},
            storage={"backend": "file", "path": root / "objects"},
            worker={"graceful_shutdown_seconds": 2},
            auth={"jwt_secret": "bench-signing-key-" + uuid.uuid4().hex},
            models={"staging_dir": root / "staging"},
        )
    finally:
        for started in reversed(running):
            await asyncio.to_thread(started.stop)


@asynccontextmanager
async def running_stack(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API and all worker pools; an API client acting as a fresh tenant's admin."""
    engine = create_engine(settings.database)
    objects = create_object_store(settings)
    await objects.ensure_ready()
    client = await temporal.connect(settings.temporal, codec=payload_codec(settings.codec))
    await temporal.ensure_search_attributes(client)
    identities = IdentityFactory(engine, settings)
    admin = await identities.user(await identities.tenant(), admin=True)
    resources = WorkerResources(
        sessions=create_sessionmaker(engine),
        vault=load_vault(settings),
        data_dir=settings.data_dir,
        objects=objects,
        models=settings.models,
    )
    workers = build_workers(
        client,
        resources,
        ALL_QUEUES,
        prefix=settings.temporal.task_queue_prefix,
        settings=settings.worker,
    )
    tasks = [asyncio.create_task(worker.run()) for worker in workers]
    api_server = ApiServer(settings)
    await asyncio.to_thread(api_server.start)
    try:
        async with httpx.AsyncClient(
            base_url=api_server.url, timeout=60, headers=admin.headers
        ) as api:
            yield api
    finally:
        await asyncio.to_thread(api_server.stop)
        await asyncio.gather(*(worker.shutdown() for worker in workers), return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        await objects.close()
        await engine.dispose()


# --- the two measurements ------------------------------------------------------------------


def snapshot_baseline(hub_url: str, cache_dir: Path) -> float:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()
    started = time.perf_counter()
    # token=False: a developer's saved token must not change what is measured.
    snapshot_download(REPO, endpoint=hub_url, cache_dir=cache_dir, token=False)
    return time.perf_counter() - started


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def phases(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each progress step's start and end, in seconds from the workflow's start."""
    steps = {step["name"]: step for step in (run.get("progress") or {}).get("steps", [])}
    origin = _when(run.get("started_at"))
    starts = [_when(s.get("started_at")) for s in steps.values()]
    origin = origin or min((s for s in starts if s is not None), default=None)
    result = []
    for name in STEPS:
        step = steps.get(name)
        if step is None:
            continue
        started, finished = _when(step.get("started_at")), _when(step.get("finished_at"))

        def offset(moment: datetime | None) -> float | None:
            if moment is None or origin is None:
                return None
            return round((moment - origin).total_seconds(), 3)

        start_s, end_s = offset(started), offset(finished)
        result.append(
            {
                "step": name,
                "status": step.get("status"),
                "start_s": start_s,
                "end_s": end_s,
                "seconds": (
                    round(end_s - start_s, 3) if start_s is not None and end_s is not None else None
                ),
                "detail": step.get("detail"),
            }
        )
    return result


async def onboard(api: httpx.AsyncClient, within: float, name: str) -> tuple[float, dict[str, Any]]:
    """Seconds from the POST to `ready`, and the workflow run as the API reports it. The
    model is deleted afterwards, so the next round downloads everything again."""
    started = time.perf_counter()
    posted = datetime.now(UTC)
    response = await api.post(
        "/api/v1/models",
        json={"name": name, "source_kind": "huggingface", "source_ref": REPO},
    )
    if response.status_code != 202:
        raise RuntimeError(f"onboarding refused: {response.status_code} {response.text}")
    created = response.json()
    # Polled slowly: every poll is an API request and a query competing with the
    # download for the same two cores. The time comes from the run's own finish.
    while True:
        body = (await api.get(f"/api/v1/models/{created['id']}")).json()
        if body.get("status") == "ready":
            break
        if body.get("status") in ("failed", "quarantined", "awaiting_approval"):
            raise RuntimeError(f"onboarding ended {body['status']}: {body.get('status_reason')}")
        if time.perf_counter() - started > within:
            raise RuntimeError(f"not ready within {within} s: {body.get('status')}")
        await asyncio.sleep(0.5)
    # The run's record trails the model's status by a bookkeeping activity.
    deadline = time.perf_counter() + 30
    while True:
        run: dict[str, Any] = (await api.get(f"/api/v1/workflows/{created['workflow_id']}")).json()
        if run.get("status") == "completed" or time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.2)
    finished = _when(run.get("finished_at"))
    if finished is None:
        raise RuntimeError(f"the run has no finish time: {run.get('status')}")
    seconds = (finished - posted).total_seconds()
    deleted = await api.delete(f"/api/v1/models/{created['id']}")
    if deleted.status_code != 204:
        raise RuntimeError(f"could not delete the model: {deleted.status_code} {deleted.text}")
    return seconds, run


# --- report --------------------------------------------------------------------------------


def rate(total: int, seconds: float) -> float:
    return round(total / MB / seconds, 1)


def print_table(report: dict[str, Any]) -> None:
    total_mb = report["repo"]["bytes"] / MB
    print(f"\nrepository: {report['repo']['files']} files, {total_mb:,.0f} MB")
    print(f"{'':<28} {'seconds':>8} {'MB/s':>8}")
    for key, label in (("snapshot_download", "snapshot_download"), ("onboarding", "onboarding")):
        entry = report[key]
        print(f"{label:<28} {entry['seconds']:>8.2f} {entry['mb_per_s']:>8.1f}")
    download = report["onboarding"]["download_mb_per_s"]
    if download is not None:
        print(f"{'  download step alone':<28} {'':>8} {download:>8.1f}")
    verdict = "meets" if report["ratio"] >= report["target_ratio"] else "misses"
    print(f"ratio {report['ratio']:.2f}x ({verdict} the {report['target_ratio']}x target)")
    print(f"\n{'step':<10} {'start s':>8} {'end s':>8} {'seconds':>8}  detail")

    def cell(value: float | None) -> str:
        return f"{value:>8.2f}" if value is not None else f"{'-':>8}"

    for phase in report["onboarding"]["phases"]:
        print(
            f"{phase['step']:<10} {cell(phase['start_s'])} {cell(phase['end_s'])}"
            f" {cell(phase['seconds'])}  {phase['detail'] or ''}"
        )


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    files = await asyncio.to_thread(build_repo, root / "repo", args.size_mb, args.shard_mb)
    total = sum(path.stat().st_size for path in files.values())
    print(f"wrote {total / MB:,.0f} MB in {time.perf_counter() - started:.1f} s", flush=True)
    hub = HubProcess(files)
    await asyncio.to_thread(hub.start)
    baselines: list[float] = []
    ours_runs: list[float] = []
    run: dict[str, Any] = {}
    try:
        async with infrastructure(root) as settings:
            settings.models.hf_endpoint = hub.url
            # Both measurements run with the stack up and idle around them, so the
            # baseline shares the machine with the same processes.
            async with running_stack(settings) as api:
                for round_no in range(args.repeat):
                    first_ours = args.ours_first != (round_no % 2 == 1)
                    order = ["onboarding", "snapshot"] if first_ours else ["snapshot", "onboarding"]
                    for which in order:
                        # Dirty pages left by one side must not be written back on the
                        # other's time.
                        await asyncio.to_thread(os.sync)
                        print(f"round {round_no + 1}: {which}...", flush=True)
                        if which == "snapshot":
                            cache = root / "hf-cache"
                            baselines.append(
                                await asyncio.to_thread(snapshot_baseline, hub.url, cache)
                            )
                            # Not needed any more; dropping it keeps the disk footprint down.
                            await asyncio.to_thread(shutil.rmtree, cache, ignore_errors=True)
                        else:
                            seconds, run = await onboard(api, args.timeout, f"bench-{round_no}")
                            ours_runs.append(seconds)
    finally:
        served = await asyncio.to_thread(hub.stop)
    baseline = statistics.median(baselines)
    ours = statistics.median(ours_runs)
    steps = phases(run)
    download = next((p for p in steps if p["step"] == "download"), None)
    download_seconds = download["seconds"] if download else None
    # Throughput ratio: same bytes, so the inverse ratio of the times.
    ratio = round(baseline / ours, 3)
    return {
        "benchmark": "model_onboarding",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        },
        "repo": {
            "id": REPO,
            "files": len(files),
            "bytes": total,
            "size_mb_arg": args.size_mb,
            "shard_mb": args.shard_mb,
        },
        "hub_bytes_served": served,
        "order": "alternating, "
        + ("onboarding first" if args.ours_first else "snapshot_download first"),
        "rounds": args.repeat,
        "snapshot_download": {
            "seconds": round(baseline, 3),
            "mb_per_s": rate(total, baseline),
            "samples_s": [round(x, 3) for x in baselines],
        },
        "onboarding": {
            "seconds": round(ours, 3),
            "samples_s": [round(x, 3) for x in ours_runs],
            "mb_per_s": rate(total, ours),
            "download_mb_per_s": rate(total, download_seconds) if download_seconds else None,
            "run_status": run.get("status"),
            "phases": steps,
        },
        "ratio": ratio,
        "target_ratio": 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="weights, in MiB")
    parser.add_argument("--shard-mb", type=int, default=512, help="largest weights file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for ready")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--ours-first", action="store_true", help="onboard before the baseline (order check)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds (order alternates); medians reported"
    )
    args = parser.parse_args()
    # Settings read CP_* variables for whatever they are not given; a developer's
    # environment must not point the bench at their own services.
    for key in [key for key in os.environ if key.startswith("CP_")]:
        del os.environ[key]
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Before anything logs: the stack's info lines would bury the progress output.
    configure_logging(level="warning")

    root = Path(tempfile.mkdtemp(prefix="cp-bench-onboard-"))
    try:
        report = asyncio.run(measure(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
