"""A model download survives its worker dying: the retry resumes from the heartbeated
offset instead of fetching the file again.

The Hugging Face Hub is unreachable here, so the repository is served by the stand-in
Hub of `tests.fixtures.hf` (streamed from disk, throttled so the download takes a while).
The `cp-model` worker is a real process, killed with SIGKILL mid-download as a crash or
an OOM kill would; the other pools run in-process and are never touched, so only the
download activity feels the crash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import struct
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlmodel import col, func, select

from activities.models import HEARTBEAT_SECONDS
from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.core.storage import FileObjectStore
from control_plane.models.sources import PROGRESS_EVERY_BYTES
from control_plane.models.tables import ModelArtifact
from tests.fixtures.hf import HubServer
from tests.fixtures.stack import StartWorkers
from tests.integration.test_clusters_kubernetes import worker_process_env
from tests.integration.test_models_onboarding import APACHE_CARD, onboard, wait_for_model
from workflows.queues import ALL_QUEUES, Queue

MIB = 1024 * 1024
REPO = "acme/resumable"
WEIGHTS = "model.safetensors"
WEIGHTS_BYTES = 200 * MIB
# About 12 s for the whole file: long enough to kill the worker in the middle.
THROTTLE = 16 * MIB
# Bytes the server has written that the worker may never have seen land on disk: loopback
# socket buffers on both ends plus the chunk being read.
IN_FLIGHT = 8 * MIB
# How far behind the last byte sent the resumed range may start: the heartbeat carries
# the offset of the last progress callback (every PROGRESS_EVERY_BYTES) and beats every
# HEARTBEAT_SECONDS, plus the progress signal each beat waits for first; a second of
# slack covers that signal and a busy event loop on a loaded machine.
RESUME_WINDOW = int((HEARTBEAT_SECONDS + 1) * THROTTLE) + PROGRESS_EVERY_BYTES + IN_FLIGHT
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "torch_dtype": "float16",
    "vocab_size": 128,
}
README = "---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# resumable\n"


def write_weights(path: Path, size: int) -> str:
    """A valid safetensors file of one `size`-byte U8 tensor of random bytes, written a
    block at a time; returns its sha256. Random so that no layer (the page cache aside)
    can shortcut the transfer, and a resume from a wrong offset breaks the digest."""
    header = json.dumps(
        {"weights": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    ).encode()
    # The safetensors writer pads the header to 8 bytes so the data stays aligned.
    header += b" " * (-len(header) % 8)
    digest = hashlib.sha256()
    rng = np.random.default_rng(20240607)
    with path.open("wb") as out:
        for piece in (struct.pack("<Q", len(header)), header):
            out.write(piece)
            digest.update(piece)
        left = size
        while left:
            block = rng.bytes(min(8 * MIB, left))
            out.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while block := reader.read(8 * MIB):
            digest.update(block)
    return digest.hexdigest()


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return "(no log)"


async def spawn_model_worker(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control_plane.cli",
            "worker",
            "--queue",
            Queue.MODEL.value,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()


async def wait_until_served(
    hub: HubServer, count: int, worker: asyncio.subprocess.Process, log: Path, within: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (served := hub.served_bytes(REPO, WEIGHTS)) < count:
        assert worker.returncode is None, f"the worker died early:\n{log_tail(log)}"
        assert loop.time() < deadline, (
            f"only {served} of {count} bytes served in {within} s:\n{log_tail(log)}"
        )
        await asyncio.sleep(0.05)


async def artifact_rows(settings: Settings, model_id: str, path: str) -> int:
    engine = create_engine(settings.database)
    try:
        async with session_scope(create_sessionmaker(engine)) as session:
            count: int = (
                await session.exec(
                    select(func.count())
                    .select_from(ModelArtifact)
                    .where(col(ModelArtifact.model_id) == uuid.UUID(model_id))
                    .where(col(ModelArtifact.path) == path)
                )
            ).one()
    finally:
        await engine.dispose()
    return count


class TestDownloadResume:
    @pytest.mark.timeout(240)
    async def test_a_killed_download_resumes_from_its_offset(
        self,
        api: httpx.AsyncClient,
        start_workers: StartWorkers,
        hf_server: HubServer,
        settings: Settings,
        tmp_path: Path,
    ) -> None:
        """Kill the cp-model worker mid-download of a 200 MB file; after restart the
        download resumes from its offset (bytes re-fetched < 25 % of the file) and
        completes."""
        weights = tmp_path / "hub" / WEIGHTS
        weights.parent.mkdir()
        weights_sha = await asyncio.to_thread(write_weights, weights, WEIGHTS_BYTES)
        size = weights.stat().st_size
        files: dict[str, bytes | Path] = {
            "config.json": json.dumps(CONFIG).encode(),
            "README.md": README.encode(),
            WEIGHTS: weights,
        }
        await asyncio.to_thread(hf_server.add_repo, REPO, files, card=APACHE_CARD)
        hf_server.throttle = THROTTLE

        # Both worker processes share the staging directory, as a restarted worker on
        # the same machine would: that is where the part file survives the crash.
        staging = tmp_path / "staging"
        settings.models.hf_endpoint = hf_server.url
        settings.models.staging_dir = staging
        env = {
            **worker_process_env(settings),
            "CP_LOG_LEVEL": "info",
            "CP_STORAGE__PATH": str(settings.objects_dir),
            "CP_MODELS__HF_ENDPOINT": hf_server.url,
            "CP_MODELS__STAGING_DIR": str(staging),
            "CP_WORKER__GRACEFUL_SHUTDOWN_SECONDS": "2",
        }
        await start_workers([queue for queue in ALL_QUEUES if queue is not Queue.MODEL])

        first_log, second_log = tmp_path / "worker-1.log", tmp_path / "worker-2.log"
        first = await spawn_model_worker(env, first_log)
        second: asyncio.subprocess.Process | None = None
        try:
            created = await onboard(
                api, name="resumable", source_kind="huggingface", source_ref=REPO
            )
            # Well into the file but far from its end, whatever the machine's speed.
            await wait_until_served(hf_server, size * 45 // 100, first, first_log, within=120)
            first.send_signal(signal.SIGKILL)
            await first.wait()
            killed_at = hf_server.served_bytes(REPO, WEIGHTS)
            assert killed_at < size * 70 // 100, "the kill came too late to show a resume"

            second = await spawn_model_worker(env, second_log)
            try:
                # The server notices the dead attempt after the 20 s heartbeat timeout,
                # then the retry resumes the rest and the model is scanned.
                body = await wait_for_model(api, created["id"], "ready", within=150)
            except AssertionError as err:
                raise AssertionError(
                    f"{err}\n--- first worker ---\n{log_tail(first_log)}"
                    f"\n--- second worker ---\n{log_tail(second_log)}"
                ) from None
        finally:
            for process in (first, second):
                if process is not None:
                    await stop(process)

        requests = hf_server.file_requests(REPO, WEIGHTS)
        spans = [(r.range_start, r.bytes_sent) for r in requests]
        assert len(requests) == 2, spans
        before, after = requests
        assert before.range_start is None, spans
        stopped_at = before.bytes_sent
        # No Range header (None) or bytes=0-: the retry threw the part file away.
        assert after.range_start, (
            f"the retry fetched the file from the start: the last heartbeat the server kept "
            f"had no offset {spans}"
        )
        assert stopped_at - RESUME_WINDOW <= after.range_start <= stopped_at, spans
        assert after.range_start + after.bytes_sent == size, spans
        served = hf_server.served_bytes(REPO, WEIGHTS)
        assert served < size * 1.25, f"{served} bytes served for a {size}-byte file: {spans}"

        assert body["scan"]["verdict"] == "clean", body["scan"]
        artifacts: dict[str, dict[str, Any]] = {a["path"]: a for a in body["artifacts"]}
        stored = artifacts[WEIGHTS]
        assert stored["size"] == size
        assert stored["sha256"] == weights_sha
        assert stored["object_key"].endswith(weights_sha)
        path = FileObjectStore(settings.objects_dir).path_for(stored["object_key"])
        assert path.is_file()
        assert await asyncio.to_thread(file_sha256, path) == weights_sha
        assert await artifact_rows(settings, created["id"], WEIGHTS) == 1
        # The completed download leaves no part file behind.
        assert not (staging / created["id"]).exists()
