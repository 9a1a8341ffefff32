"""Replica sets of the `local` provider: supervised child processes on this machine.

Layout under the replicas directory, one directory per set:

    <replicas_dir>/<set name>/<index>.json   state of replica `<set name>-<index>`
    <replicas_dir>/<set name>/<index>.log    its stdout and stderr, appended across starts
    <replicas_dir>/<set name>/.lock          flock held while a worker changes the set

Replicas run in their own session (`start_new_session=True`), so they outlive the worker
that started them; a restarted worker adopts them from their state files instead of
restarting them. A state file names a process by pid AND creation time, so a pid the
kernel handed to another process after the replica died is never adopted nor signalled.

Choices:

* `ensure_replicas` replaces UNHEALTHY replicas as it replaces exited ones: a replica is
  UNHEALTHY only once it has outlived `startup_timeout_s` without answering its health
  check (or stopped answering it), and a local process in that state does not recover
  by waiting; the workflow decides how often to call `ensure_replicas`, so it also
  decides how patient to be.
* A replica whose process exits within `start_watch_s` with "address already in use" in
  its log lost a port race (ports are chosen by binding to 0 and releasing): it is
  started again on another port without counting a restart.
* Every command is an argument vector (never a shell); blocking work (spawning, psutil,
  file I/O, waits) runs in threads or as `asyncio.sleep` polls, never in the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel

from control_plane.clusters.providers.base import (
    ClusterUnreachable,
    ProviderError,
    ReplicaNotFound,
)
from control_plane.core.logging import get_logger
from workflows.contracts.endpoints import (
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    PYTHON_PLACEHOLDER,
    LaunchSpec,
    ReplicaInfo,
    ReplicaSetSpec,
    ReplicaState,
)

log = get_logger(__name__)

HEALTH_TIMEOUT_S = 2.0
STOP_GRACE_S = 5.0
LOCK_TIMEOUT_S = 60.0
START_WATCH_S = 3.0
PORT_ATTEMPTS = 5
LOOPBACK = "127.0.0.1"
MARKER = "==== control-plane:"
_POLL_S = 0.05
# psutil derives create_time from boot time and clock ticks (10 ms); two processes with
# the same pid less than this apart cannot happen, a float rounding difference can.
_CREATE_TIME_TOLERANCE_S = 0.05
_KILL_WAIT_S = 2.0
_CLASH = re.compile(r"address (?:already )?in use", re.IGNORECASE)
# Set names become directory names: nothing that could climb out of the replicas dir.
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_REASON = 300
_TAIL_BLOCK = 8192
# A tail of long lines must not load a multi-gigabyte log into memory.
_TAIL_MAX_BYTES = 8 * 1024 * 1024
# Lines looked at for the exit reason and for a port clash (the end of the last start).
_REASON_LINES = 200


class ReplicaRecord(BaseModel):
    """The state file of one replica."""

    index: int
    pid: int
    # psutil's create_time of `pid`: with it, a reused pid is told apart.
    create_time: float
    port: int
    url: str
    started_at: datetime
    # `launch_fingerprint` of the spec the replica was started from.
    fingerprint: str
    restarts: int = 0


def launch_fingerprint(launch: LaunchSpec) -> str:
    """sha256 of the launch spec as canonical JSON (sorted keys), so that the same spec
    built in another key order is the same replica."""
    canonical = json.dumps(launch.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def replica_name(set_name: str, index: int) -> str:
    return f"{set_name}-{index}"


def free_port() -> int:
    """A loopback port free right now (bind to 0, then release): another process may
    take it before the replica binds it, which the start watch detects and retries."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def tail_lines(path: Path, lines: int) -> str:
    """The last `lines` lines of `path`, read backwards block by block ("" when the file
    does not exist)."""
    if lines <= 0:
        return ""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return ""
    with file:
        position = file.seek(0, os.SEEK_END)
        blocks: list[bytes] = []
        newlines = read = 0
        # One newline more than asked for proves the oldest line kept is complete.
        while position > 0 and newlines <= lines and read < _TAIL_MAX_BYTES:
            size = min(_TAIL_BLOCK, position)
            position -= size
            file.seek(position)
            block = file.read(size)
            blocks.append(block)
            newlines += block.count(b"\n")
            read += len(block)
    kept = b"".join(reversed(blocks)).splitlines()[-lines:]
    return "\n".join(line.decode(errors="replace") for line in kept)


def _output_since_start(log_path: Path) -> list[str]:
    """The log lines written since the last start marker."""
    lines = tail_lines(log_path, _REASON_LINES).splitlines()
    for position in range(len(lines) - 1, -1, -1):
        if lines[position].startswith(MARKER):
            return lines[position + 1 :]
    return lines


def _last_output_line(log_path: Path) -> str:
    for line in reversed(_output_since_start(log_path)):
        if line.strip():
            return line.strip()[:_MAX_REASON]
    return ""


def _lost_port_race(log_path: Path) -> bool:
    return any(_CLASH.search(line) for line in _output_since_start(log_path))


@dataclass
class _Child:
    popen: subprocess.Popen[bytes]
    create_time: float


# Replicas this process started, by pid. Their `Popen` reaps them and keeps their exit
# code. Module-wide because activities build a provider per call: an abandoned `Popen`
# would be reaped by `subprocess` behind our back and the exit code lost.
_CHILDREN: dict[int, _Child] = {}

# One asyncio lock per set name and event loop, shared by every provider instance of
# this process (an `asyncio.Lock` must not be used from two loops).
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _set_lock(name: str) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(name, asyncio.Lock())


def _same_time(a: float, b: float) -> bool:
    return abs(a - b) <= _CREATE_TIME_TOLERANCE_S


@dataclass(frozen=True)
class _Liveness:
    alive: bool
    exit_code: int | None = None
    # Why the process is not there, when no exit code says it.
    detail: str = ""


def _liveness(record: ReplicaRecord) -> _Liveness:
    """Is the replica's process still running? Reaps it when it is our exited child, so
    that it reads as exited and not as a zombie forever."""
    child = _CHILDREN.get(record.pid)
    ours = child is not None and _same_time(child.create_time, record.create_time)
    if child is not None and ours:
        code = child.popen.poll()
        if code is not None:
            return _Liveness(alive=False, exit_code=code)
    try:
        process = psutil.Process(record.pid)
        if not _same_time(process.create_time(), record.create_time):
            return _Liveness(
                alive=False,
                detail=f"process {record.pid} is gone (the pid now belongs to another process)",
            )
        if process.status() != psutil.STATUS_ZOMBIE:
            return _Liveness(alive=True)
    except psutil.NoSuchProcess:
        return _Liveness(alive=False, detail=f"process {record.pid} is gone")
    if child is not None and ours:
        return _Liveness(alive=False, exit_code=child.popen.poll())
    return _Liveness(alive=False, exit_code=_reap(record.pid))


def _reap(pid: int) -> int | None:
    """Collect a zombie child started by this process outside `_CHILDREN`; None when it
    is not our child (its own parent, or init, reaps it)."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if reaped == pid else None


def _exit_reason(live: _Liveness, last_line: str) -> str:
    code = live.exit_code
    if code is None:
        head = live.detail or "exited (exit code unknown)"
    elif code < 0:
        try:
            head = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            head = f"killed by signal {-code}"
    else:
        head = f"exit code {code}"
    return f"{head}: {last_line}" if last_line else head


def _signal_group(record: ReplicaRecord, sig: signal.Signals) -> bool:
    """Signal the replica's process group, but only while its leader is still the
    replica (running or an unreaped zombie, so the group id cannot have been reused).
    Returns whether the replica was there to signal."""
    try:
        process = psutil.Process(record.pid)
        if not _same_time(process.create_time(), record.create_time):
            return False
    except psutil.NoSuchProcess:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # start_new_session made the replica the leader of a group with its own pid.
        os.killpg(record.pid, sig)
    return True


def _kill_stragglers(pid: int) -> None:
    """SIGKILL what is left of a replica's group after its leader exited. Only while
    the pid is unused: a group id lives as long as a member does, so processes still in
    the group are the replica's own descendants, never a stranger."""
    if psutil.pid_exists(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _listening(pid: int, port: int) -> bool:
    """Does the replica (or a process it started) listen on `port`?"""
    try:
        process = psutil.Process(pid)
        for member in [process, *process.children(recursive=True)]:
            for conn in member.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return True
    except psutil.Error:
        return False
    return False


def _check_set_name(name: str) -> None:
    if not _SET_NAME.match(name):
        raise ProviderError(f"invalid replica set name {name!r}")


def _check_launch(launch: LaunchSpec) -> None:
    if not launch.command:
        raise ProviderError("the launch spec has an empty command")
    texts = [*launch.command, *launch.env.values()]
    if any(MODEL_DIR_PLACEHOLDER in text for text in texts):
        raise ProviderError(
            f"the launch spec still contains {MODEL_DIR_PLACEHOLDER}: the model directory "
            "must be filled in before replicas are started"
        )
    if not sys.executable:
        raise ProviderError("no Python interpreter path to fill in for {python}")


def _fill(text: str, port: int) -> str:
    return text.replace(PORT_PLACEHOLDER, str(port)).replace(PYTHON_PLACEHOLDER, sys.executable)


def _read_records(set_dir: Path) -> dict[int, ReplicaRecord]:
    records: dict[int, ReplicaRecord] = {}
    if not set_dir.is_dir():
        return records
    for path in set_dir.glob("*.json"):
        if not path.stem.isdigit():
            continue
        try:
            records[int(path.stem)] = ReplicaRecord.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            # Written atomically, so only a hand-edited file is unreadable: treated as
            # missing, the index gets a fresh replica.
            log.warning("replicas.local.unreadable_state", path=str(path))
    return records


def _known_indexes(set_dir: Path) -> set[int]:
    """Indexes with a state file or a kept log."""
    if not set_dir.is_dir():
        return set()
    return {
        int(path.stem)
        for path in set_dir.iterdir()
        if path.suffix in (".json", ".log") and path.stem.isdigit()
    }


def _write_record(path: Path, record: ReplicaRecord) -> None:
    # tmp + rename: a reader (another worker) never sees half a state file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json())
    os.replace(tmp, path)


class _Started(Enum):
    RUNNING = "running"
    EXITED = "exited"
    PORT_CLASH = "port_clash"


class LocalReplicas:
    """Replica sets kept as supervised processes under `root` (see the module doc).

    `pick_port` chooses each replica's port (tests make it return a taken one). Timeouts
    are seconds: the health check, SIGTERM to SIGKILL, waiting for another worker's set
    lock, and watching a fresh replica for an immediate exit.
    """

    def __init__(
        self,
        root: Path,
        *,
        node: str | None = None,
        pick_port: Callable[[], int] = free_port,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        stop_grace_s: float = STOP_GRACE_S,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        start_watch_s: float = START_WATCH_S,
    ) -> None:
        self._root = root
        self._node = node or socket.gethostname()
        self._pick_port = pick_port
        self._health_timeout = health_timeout_s
        self._stop_grace = stop_grace_s
        self._lock_timeout = lock_timeout_s
        self._start_watch = start_watch_s

    @property
    def root(self) -> Path:
        return self._root

    def set_dir(self, name: str) -> Path:
        _check_set_name(name)
        return self._root / name

    def state_path(self, name: str, index: int) -> Path:
        return self.set_dir(name) / f"{index}.json"

    def log_path(self, name: str, index: int) -> Path:
        return self.set_dir(name) / f"{index}.log"

    # -- the ReplicaProvider methods ------------------------------------------------

    async def ensure_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        _check_set_name(spec.name)
        _check_launch(spec.launch)
        fingerprint = launch_fingerprint(spec.launch)
        async with self._locked(spec.name) as set_dir:
            records = await asyncio.to_thread(_read_records, set_dir)
            infos = await self._inspect_all(spec.name, spec.launch, records)
            for index in sorted((i for i in records if i >= spec.replicas), reverse=True):
                await self._stop(spec.name, index, records[index])
            results = await asyncio.gather(
                *(
                    self._converge(spec, index, records.get(index), infos.get(index), fingerprint)
                    for index in range(spec.replicas)
                ),
                return_exceptions=True,
            )
            # Every start finished (or failed) before the lock is released.
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return await self._current(spec.name, spec.launch)

    async def list_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        _check_set_name(spec.name)
        return await self._current(spec.name, spec.launch)

    async def delete_replicas(self, name: str) -> list[str]:
        set_dir = self.set_dir(name)
        if not await asyncio.to_thread(set_dir.is_dir):
            return []
        async with self._locked(name):
            records = await asyncio.to_thread(_read_records, set_dir)
            await asyncio.gather(*(self._stop(name, i, r) for i, r in records.items()))
        return [replica_name(name, index) for index in sorted(records)]

    async def replica_logs(self, name: str, replica: str | None, tail: int) -> dict[str, str]:
        """Logs of the replicas that exist and of stopped ones whose log is kept."""
        set_dir = self.set_dir(name)
        indexes = await asyncio.to_thread(_known_indexes, set_dir)
        if replica is not None:
            prefix = f"{name}-"
            suffix = replica[len(prefix) :] if replica.startswith(prefix) else ""
            if not suffix.isdigit() or int(suffix) not in indexes:
                raise ReplicaNotFound(f"replica {replica} does not exist in set {name}")
            indexes = {int(suffix)}
        return {
            replica_name(name, index): await asyncio.to_thread(
                tail_lines, self.log_path(name, index), tail
            )
            for index in sorted(indexes)
        }

    # -- machinery -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[Path]:
        """Hold the set against this process's other tasks (asyncio lock) and against
        other workers (flock on the set's `.lock`), polled so the loop never blocks."""
        set_dir = self.set_dir(name)
        loop = asyncio.get_running_loop()
        async with _set_lock(name):
            try:
                await asyncio.to_thread(set_dir.mkdir, parents=True, exist_ok=True)
                fd = await asyncio.to_thread(
                    os.open, set_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644
                )
            except OSError as exc:
                raise ProviderError(
                    f"replicas directory {set_dir} is not usable: {exc.strerror or exc}"
                ) from exc
            try:
                deadline = loop.time() + self._lock_timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if loop.time() >= deadline:
                            raise ClusterUnreachable(
                                f"replica set {name} is held by another worker for more "
                                f"than {self._lock_timeout:g} s"
                            ) from None
                        await asyncio.sleep(_POLL_S)
                try:
                    yield set_dir
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    async def _current(self, name: str, launch: LaunchSpec) -> list[ReplicaInfo]:
        records = await asyncio.to_thread(_read_records, self.set_dir(name))
        infos = await self._inspect_all(name, launch, records)
        return [infos[index] for index in sorted(infos)]

    async def _inspect_all(
        self, name: str, launch: LaunchSpec, records: dict[int, ReplicaRecord]
    ) -> dict[int, ReplicaInfo]:
        if not records:
            return {}
        # trust_env=False: a proxy from the environment must never sit between us and
        # a loopback replica.
        async with httpx.AsyncClient(timeout=self._health_timeout, trust_env=False) as client:
            infos = await asyncio.gather(
                *(self._inspect(name, i, r, launch, client) for i, r in records.items())
            )
        return dict(zip(records, infos, strict=True))

    async def _inspect(
        self,
        name: str,
        index: int,
        record: ReplicaRecord,
        launch: LaunchSpec,
        client: httpx.AsyncClient,
    ) -> ReplicaInfo:
        info = ReplicaInfo(
            name=replica_name(name, index),
            state=ReplicaState.STARTING,
            url=record.url,
            index=index,
            pid=record.pid,
            port=record.port,
            node=self._node,
            started_at=record.started_at,
            restarts=record.restarts,
        )
        live = await asyncio.to_thread(_liveness, record)
        if not live.alive:
            last_line = await asyncio.to_thread(_last_output_line, self.log_path(name, index))
            reason = _exit_reason(live, last_line)
            return info.model_copy(
                update={"state": ReplicaState.EXITED, "url": None, "reason": reason}
            )
        if await self._healthy(client, record.url, launch.health_path):
            return info.model_copy(update={"state": ReplicaState.READY})
        age = (datetime.now(UTC) - record.started_at).total_seconds()
        if age < launch.startup_timeout_s:
            return info
        reason = (
            f"health check {launch.health_path} not answering {age:.0f} s after start "
            f"(startup timeout {launch.startup_timeout_s:g} s)"
        )
        return info.model_copy(update={"state": ReplicaState.UNHEALTHY, "reason": reason})

    @staticmethod
    async def _healthy(client: httpx.AsyncClient, url: str, path: str) -> bool:
        if not path.startswith("/"):
            path = f"/{path}"
        try:
            response = await client.get(f"{url}{path}")
        except httpx.HTTPError:
            return False
        return response.is_success

    async def _converge(
        self,
        spec: ReplicaSetSpec,
        index: int,
        record: ReplicaRecord | None,
        info: ReplicaInfo | None,
        fingerprint: str,
    ) -> None:
        restarts = 0
        if record is not None and info is not None:
            same_spec = record.fingerprint == fingerprint
            if same_spec and info.state in (ReplicaState.READY, ReplicaState.STARTING):
                return
            # A changed spec is a new replica (restarts from 0); a failed one is restarted.
            restarts = record.restarts + 1 if same_spec else 0
            await self._stop(spec.name, index, record)
            log.info(
                "replicas.local.replacing",
                replica=replica_name(spec.name, index),
                state=info.state.value,
                reason=info.reason if same_spec else "spec changed",
            )
        await self._start(spec, index, fingerprint, restarts)

    async def _start(
        self, spec: ReplicaSetSpec, index: int, fingerprint: str, restarts: int
    ) -> None:
        name = replica_name(spec.name, index)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = self._pick_port()
            try:
                record = await asyncio.to_thread(
                    self._spawn, spec, index, port, fingerprint, restarts, attempt
                )
            except OSError as exc:
                raise ProviderError(
                    f"replica {name} could not be started: {exc.strerror or exc}"
                ) from exc
            outcome = await self._watch(spec.name, index, record)
            if outcome is not _Started.PORT_CLASH:
                log.info(
                    "replicas.local.started",
                    replica=name,
                    pid=record.pid,
                    port=port,
                    outcome=outcome.value,
                )
                return
            log.info("replicas.local.port_clash", replica=name, port=port, attempt=attempt)
            _CHILDREN.pop(record.pid, None)
        # Out of attempts: the last record stays, and lists the clash as an exit reason.

    def _spawn(
        self,
        spec: ReplicaSetSpec,
        index: int,
        port: int,
        fingerprint: str,
        restarts: int,
        attempt: int,
    ) -> ReplicaRecord:
        launch = spec.launch
        argv = [_fill(arg, port) for arg in launch.command]
        # Replicas inherit the worker's environment like any child process (PATH, caches,
        # proxies); the spec's variables win.
        env = {**os.environ, **{key: _fill(value, port) for key, value in launch.env.items()}}
        started_at = datetime.now(UTC)
        name = replica_name(spec.name, index)
        marker = (
            f"{MARKER} {started_at.isoformat()} starting {name} on port {port} "
            f"(restarts {restarts}, attempt {attempt}) ====\n"
        )
        with self.log_path(spec.name, index).open("ab") as log_file:
            log_file.write(marker.encode())
            log_file.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
                # Its own session: it survives the worker, and its whole group is stopped.
                start_new_session=True,
            )
        # Until we reap it, even an exited child keeps its /proc entry and create_time.
        create_time = psutil.Process(popen.pid).create_time()
        _CHILDREN[popen.pid] = _Child(popen=popen, create_time=create_time)
        record = ReplicaRecord(
            index=index,
            pid=popen.pid,
            create_time=create_time,
            port=port,
            url=f"http://{LOOPBACK}:{port}",
            started_at=started_at,
            fingerprint=fingerprint,
            restarts=restarts,
        )
        _write_record(self.state_path(spec.name, index), record)
        return record

    async def _watch(self, name: str, index: int, record: ReplicaRecord) -> _Started:
        """Watch a fresh replica until it listens on its port, exits, or the watch ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_watch
        while True:
            live = await asyncio.to_thread(_liveness, record)
            if not live.alive:
                clash = await asyncio.to_thread(_lost_port_race, self.log_path(name, index))
                return _Started.PORT_CLASH if clash else _Started.EXITED
            if await asyncio.to_thread(_listening, record.pid, record.port):
                return _Started.RUNNING
            if loop.time() >= deadline:
                return _Started.RUNNING
            await asyncio.sleep(_POLL_S)

    async def _stop(self, name: str, index: int, record: ReplicaRecord) -> None:
        """SIGTERM the replica's group, SIGKILL it after the grace period, then forget
        the replica (its log is kept)."""
        await self._terminate(record)
        path = self.state_path(name, index)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        child = _CHILDREN.get(record.pid)
        if child is not None and _same_time(child.create_time, record.create_time):
            del _CHILDREN[record.pid]
        log.info("replicas.local.stopped", replica=replica_name(name, index), pid=record.pid)

    async def _terminate(self, record: ReplicaRecord) -> None:
        if not await asyncio.to_thread(_signal_group, record, signal.SIGTERM):
            return
        if not await self._gone_within(record, self._stop_grace):
            await asyncio.to_thread(_signal_group, record, signal.SIGKILL)
            await self._gone_within(record, _KILL_WAIT_S)
        await asyncio.to_thread(_kill_stragglers, record.pid)

    async def _gone_within(self, record: ReplicaRecord, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if not (await asyncio.to_thread(_liveness, record)).alive:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
