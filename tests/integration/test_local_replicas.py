"""Replica sets of the `local` provider, with real processes.

Replicas run the real simulator server (`python -m control_plane.endpoints.engines.simulator`)
or tiny `python -c` programs, on real loopback ports; state and logs go to a temporary
replicas directory. Nothing is replaced: the tests signal real processes and read the
real state files. Every test removes its replicas when it ends, passed or failed.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import pytest

from control_plane.clusters.providers.base import (
    ClusterUnreachable,
    ProviderError,
    ReplicaNotFound,
    ReplicaProvider,
)
from control_plane.clusters.providers.local import LocalProvider
from control_plane.clusters.providers.local_replicas import (
    MARKER,
    LocalReplicas,
    ReplicaRecord,
    launch_fingerprint,
    tail_lines,
)
from control_plane.endpoints.engines.base import EngineRequest, render
from workflows.contracts.clusters import ClusterKind
from workflows.contracts.endpoints import (
    PYTHON_PLACEHOLDER,
    EngineKind,
    LaunchSpec,
    ReplicaInfo,
    ReplicaSetSpec,
    ReplicaState,
)

REPO = Path(__file__).resolve().parents[2]
WITHIN = 15.0


def conforms(provider: LocalProvider) -> ReplicaProvider:
    """mypy checks here that the provider satisfies the `ReplicaProvider` protocol."""
    return provider


def simulator(model: str = "sim") -> LaunchSpec:
    request = EngineRequest(
        engine=EngineKind.SIMULATOR, served_model_name=model, cluster_kind=ClusterKind.LOCAL
    )
    return render(request, {"ttft_ms": 0, "itl_ms": 0})


def program(code: str, **changes: object) -> LaunchSpec:
    """A launch spec running `python -c code` (it serves nothing)."""
    return simulator().model_copy(update={"command": [PYTHON_PLACEHOLDER, "-c", code], **changes})


def replica_set(launch: LaunchSpec, replicas: int) -> ReplicaSetSpec:
    endpoint_id = uuid.uuid4()
    return ReplicaSetSpec(
        endpoint_id=endpoint_id,
        name=f"cp-ep-{endpoint_id.hex[:12]}",
        launch=launch,
        replicas=replicas,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_for(
    provider: ReplicaProvider,
    spec: ReplicaSetSpec,
    done: Callable[[list[ReplicaInfo]], bool],
    within: float = WITHIN,
) -> list[ReplicaInfo]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        replicas = await provider.list_replicas(spec)
        if done(replicas):
            return replicas
        assert loop.time() < deadline, [(r.name, r.state, r.reason) for r in replicas]
        await asyncio.sleep(0.1)


def all_ready(count: int) -> Callable[[list[ReplicaInfo]], bool]:
    def check(replicas: list[ReplicaInfo]) -> bool:
        return len(replicas) == count and all(r.state is ReplicaState.READY for r in replicas)

    return check


async def ready(provider: ReplicaProvider, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
    await provider.ensure_replicas(spec)
    return await wait_for(provider, spec, all_ready(spec.replicas))


def pids(replicas: list[ReplicaInfo]) -> dict[str, int | None]:
    return {r.name: r.pid for r in replicas}


@pytest.fixture
async def replicas_dir(tmp_path: Path) -> AsyncIterator[Path]:
    root = tmp_path / "replicas"
    try:
        yield root
    finally:
        if root.is_dir():
            cleaner = LocalProvider(replicas_dir=root)
            for set_dir in root.iterdir():
                await cleaner.delete_replicas(set_dir.name)


@pytest.fixture
def provider(replicas_dir: Path) -> LocalProvider:
    return LocalProvider(replicas_dir=replicas_dir)


class TestStarting:
    async def test_replicas_become_ready_and_serve(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 2)
        replicas = await ready(provider, spec)

        assert [r.name for r in replicas] == [f"{spec.name}-0", f"{spec.name}-1"]
        assert [r.index for r in replicas] == [0, 1]
        assert len({r.port for r in replicas}) == 2
        async with httpx.AsyncClient(trust_env=False) as client:
            for replica in replicas:
                assert replica.url == f"http://127.0.0.1:{replica.port}"
                assert replica.node == socket.gethostname()
                assert replica.restarts == 0
                assert replica.started_at is not None
                response = await client.get(f"{replica.url}/v1/models")
                assert response.status_code == 200
                assert response.json()["data"][0]["id"] == "sim"

    async def test_state_is_written_per_replica(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 1)
        (replica,) = await ready(provider, spec)

        record = ReplicaRecord.model_validate_json(
            (replicas_dir / spec.name / "0.json").read_text()
        )
        assert record.pid == replica.pid
        assert record.port == replica.port
        assert record.url == replica.url
        assert record.fingerprint == launch_fingerprint(spec.launch)
        assert record.create_time == pytest.approx(psutil.Process(record.pid).create_time())
        assert (replicas_dir / spec.name / "0.log").read_text().startswith(MARKER)

    async def test_replicas_run_in_their_own_session(self, provider: LocalProvider) -> None:
        # So that they outlive the worker that started them, and stop as a group.
        spec = replica_set(simulator(), 1)
        (replica,) = await ready(provider, spec)
        assert replica.pid is not None
        assert os.getsid(replica.pid) == replica.pid != os.getsid(0)

    async def test_a_command_that_exits_at_once_is_reported_exited(
        self, provider: LocalProvider
    ) -> None:
        spec = replica_set(program("import sys; print('bad config'); sys.exit(3)"), 1)
        await provider.ensure_replicas(spec)

        (replica,) = await wait_for(
            provider, spec, lambda rs: rs[0].state is ReplicaState.EXITED, within=5
        )
        assert replica.reason == "exit code 3: bad config"
        assert replica.url is None

    async def test_a_spec_still_holding_model_dir_is_refused(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        launch = program("pass", env={"WEIGHTS": "{model_dir}/model.safetensors"})
        with pytest.raises(ProviderError, match=r"\{model_dir\}"):
            await provider.ensure_replicas(replica_set(launch, 1))
        assert not await asyncio.to_thread(replicas_dir.exists)

    async def test_a_provider_without_replicas_dir_refuses(self) -> None:
        with pytest.raises(ProviderError, match="replicas directory"):
            await LocalProvider().ensure_replicas(replica_set(simulator(), 1))

    async def test_a_port_taken_meanwhile_is_retried_on_another(self, replicas_dir: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            taken_port = taken.getsockname()[1]
            ports = iter([taken_port])
            replicas = LocalReplicas(replicas_dir, pick_port=lambda: next(ports, 0) or free_port())
            spec = replica_set(simulator(), 1)
            await replicas.ensure_replicas(spec)
            (replica,) = await wait_for(replicas, spec, all_ready(1))

        assert replica.port != taken_port
        assert replica.restarts == 0
        log = (replicas_dir / spec.name / "0.log").read_text()
        assert log.count(MARKER) == 2
        assert "address already in use" in log


class TestAdoption:
    async def test_a_new_provider_adopts_running_replicas(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 2)
        before = await ready(provider, spec)

        after = await LocalProvider(replicas_dir=replicas_dir).ensure_replicas(spec)

        assert pids(after) == pids(before)
        assert [r.restarts for r in after] == [0, 0]
        assert (replicas_dir / spec.name / "1.log").read_text().count(MARKER) == 1

    async def test_replicas_outlive_a_killed_worker_and_are_adopted(
        self, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 1)
        worker_code = (
            "import asyncio, json, sys\n"
            "from pathlib import Path\n"
            "from control_plane.clusters.providers.local import LocalProvider\n"
            "from workflows.contracts.endpoints import ReplicaSetSpec\n"
            "async def main():\n"
            "    spec = ReplicaSetSpec.model_validate_json(sys.argv[2])\n"
            "    provider = LocalProvider(replicas_dir=Path(sys.argv[1]))\n"
            "    infos = await provider.ensure_replicas(spec)\n"
            "    print('pids=' + json.dumps([i.pid for i in infos]), flush=True)\n"
            "    await asyncio.sleep(600)\n"
            "asyncio.run(main())\n"
        )
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            worker_code,
            str(replicas_dir),
            spec.model_dump_json(),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert worker.stdout is not None
            line = b""
            while not line.startswith(b"pids="):
                line = await asyncio.wait_for(worker.stdout.readline(), WITHIN)
                assert line, "the worker ended without starting its replica"
            (started_pid,) = json.loads(line.removeprefix(b"pids="))
        finally:
            worker.kill()
            await worker.wait()

        assert running(started_pid)
        assert psutil.Process(started_pid).ppid() != os.getpid()
        adopted = await LocalProvider(replicas_dir=replicas_dir).ensure_replicas(spec)
        assert pids(adopted) == {f"{spec.name}-0": started_pid}
        await wait_for(LocalProvider(replicas_dir=replicas_dir), spec, all_ready(1))

        await LocalProvider(replicas_dir=replicas_dir).delete_replicas(spec.name)
        assert not running(started_pid)

    async def test_a_pid_now_held_by_another_process_is_not_adopted(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 1)
        set_dir = replicas_dir / spec.name
        set_dir.mkdir(parents=True)
        # The state of a replica that died, whose pid the kernel gave to this very test
        # process: same pid, another creation time.
        stale = ReplicaRecord(
            index=0,
            pid=os.getpid(),
            create_time=psutil.Process().create_time() - 1000,
            port=free_port(),
            url="http://127.0.0.1:1",
            started_at=datetime.now(UTC),
            fingerprint=launch_fingerprint(spec.launch),
        )
        (set_dir / "0.json").write_text(stale.model_dump_json())

        (listed,) = await provider.list_replicas(spec)
        assert listed.state is ReplicaState.EXITED
        assert "belongs to another process" in listed.reason

        (replica,) = await ready(provider, spec)
        assert replica.pid != os.getpid()
        assert replica.restarts == 1

    async def test_a_changed_spec_replaces_the_replicas(self, provider: LocalProvider) -> None:
        spec = replica_set(simulator(), 1)
        (old,) = await ready(provider, spec)

        changed = spec.model_copy(update={"launch": simulator("sim-2")})
        (new,) = await ready(provider, changed)

        assert new.pid != old.pid
        assert old.pid is not None
        assert not running(old.pid)
        assert new.restarts == 0
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{new.url}/v1/models")
        assert response.json()["data"][0]["id"] == "sim-2"


class TestRepair:
    async def test_a_killed_replica_is_exited_then_replaced_alone(
        self, provider: LocalProvider
    ) -> None:
        spec = replica_set(simulator(), 2)
        before = await ready(provider, spec)
        victim = before[0].pid
        assert victim is not None

        os.kill(victim, signal.SIGKILL)
        listed = await wait_for(
            provider, spec, lambda rs: rs[0].state is ReplicaState.EXITED, within=5
        )
        assert listed[0].reason.startswith("killed by signal SIGKILL")
        assert listed[1].state is ReplicaState.READY

        after = await ready(provider, spec)
        assert after[0].pid != victim
        assert after[0].restarts == 1
        assert after[1].pid == before[1].pid
        assert after[1].restarts == 0

    async def test_scaling_down_stops_the_highest_index(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 2)
        before = await ready(provider, spec)

        after = await provider.ensure_replicas(spec.model_copy(update={"replicas": 1}))

        assert pids(after) == {f"{spec.name}-0": before[0].pid}
        removed = before[1].pid
        assert removed is not None
        assert not running(removed)
        assert not (replicas_dir / spec.name / "1.json").exists()
        assert (replicas_dir / spec.name / "1.log").exists()

    async def test_a_replica_unhealthy_past_its_startup_timeout_is_replaced(
        self, provider: LocalProvider
    ) -> None:
        launch = simulator().model_copy(update={"health_path": "/absent", "startup_timeout_s": 1.5})
        spec = replica_set(launch, 1)
        (started,) = await provider.ensure_replicas(spec)
        assert started.state is ReplicaState.STARTING

        (unhealthy,) = await wait_for(
            provider, spec, lambda rs: rs[0].state is ReplicaState.UNHEALTHY, within=5
        )
        assert "startup timeout" in unhealthy.reason

        (replaced,) = await provider.ensure_replicas(spec)
        assert replaced.pid != unhealthy.pid
        assert replaced.restarts == 1

    async def test_concurrent_ensures_start_each_replica_once(self, replicas_dir: Path) -> None:
        spec = replica_set(simulator(), 2)
        first, second = (
            LocalProvider(replicas_dir=replicas_dir),
            LocalProvider(replicas_dir=replicas_dir),
        )
        one, two = await asyncio.gather(first.ensure_replicas(spec), second.ensure_replicas(spec))
        assert pids(one) == pids(two)
        for index in (0, 1):
            log = (replicas_dir / spec.name / f"{index}.log").read_text()
            assert log.count(MARKER) == 1

    async def test_a_set_held_by_another_worker_waits_for_it(self, replicas_dir: Path) -> None:
        spec = replica_set(simulator(), 1)
        set_dir = replicas_dir / spec.name
        set_dir.mkdir(parents=True)
        fd = os.open(set_dir / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            impatient = LocalReplicas(replicas_dir, lock_timeout_s=0.3)
            with pytest.raises(ClusterUnreachable, match="held by another worker"):
                await impatient.ensure_replicas(spec)
        finally:
            os.close(fd)
        assert not (set_dir / "0.json").exists()


class TestLogsAndDelete:
    CHATTY = "import time\nfor i in range(50): print(f'line {i}', flush=True)\ntime.sleep(60)"

    async def test_logs_return_the_last_lines_of_each_replica(
        self, provider: LocalProvider
    ) -> None:
        spec = replica_set(program(self.CHATTY), 2)
        await provider.ensure_replicas(spec)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHIN
        while True:
            logs = await provider.replica_logs(spec.name, None, 3)
            if all(text.endswith("line 49") for text in logs.values()):
                break
            assert loop.time() < deadline, logs
            await asyncio.sleep(0.1)

        assert logs == {
            f"{spec.name}-0": "line 47\nline 48\nline 49",
            f"{spec.name}-1": "line 47\nline 48\nline 49",
        }
        one = await provider.replica_logs(spec.name, f"{spec.name}-1", 1)
        assert one == {f"{spec.name}-1": "line 49"}

    async def test_logs_of_an_unknown_replica_are_not_found(self, provider: LocalProvider) -> None:
        spec = replica_set(program(self.CHATTY), 1)
        await provider.ensure_replicas(spec)
        for unknown in (f"{spec.name}-1", f"{spec.name}-x", "other-0"):
            with pytest.raises(ReplicaNotFound):
                await provider.replica_logs(spec.name, unknown, 10)

    def test_tail_reads_only_the_end_of_a_large_log(self, tmp_path: Path) -> None:
        path = tmp_path / "big.log"
        path.write_text("".join(f"line {i}\n" for i in range(200_000)))
        assert tail_lines(path, 2) == "line 199998\nline 199999"
        assert tail_lines(path, 0) == ""
        assert tail_lines(tmp_path / "absent.log", 5) == ""

    async def test_delete_stops_every_replica_and_is_idempotent(
        self, provider: LocalProvider, replicas_dir: Path
    ) -> None:
        spec = replica_set(simulator(), 2)
        before = await ready(provider, spec)

        removed = await provider.delete_replicas(spec.name)

        assert removed == [f"{spec.name}-0", f"{spec.name}-1"]
        assert not any(r.pid is not None and running(r.pid) for r in before)
        assert not list((replicas_dir / spec.name).glob("*.json"))
        assert len(list((replicas_dir / spec.name).glob("*.log"))) == 2
        assert await provider.list_replicas(spec) == []
        assert await provider.delete_replicas(spec.name) == []
        assert await provider.delete_replicas("cp-ep-never-made") == []

    async def test_a_replica_ignoring_sigterm_is_killed(self, replicas_dir: Path) -> None:
        stubborn = (
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('up', flush=True)\n"
            "time.sleep(60)"
        )
        spec = replica_set(program(stubborn), 1)
        replicas = LocalReplicas(replicas_dir, stop_grace_s=0.5)
        (replica,) = await replicas.ensure_replicas(spec)
        assert replica.pid is not None
        # The handler must be installed before SIGTERM comes.
        log = replicas_dir / spec.name / "0.log"
        deadline = asyncio.get_running_loop().time() + WITHIN
        while "up" not in tail_lines(log, 1):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)

        assert await replicas.delete_replicas(spec.name) == [f"{spec.name}-0"]
        assert not running(replica.pid)
