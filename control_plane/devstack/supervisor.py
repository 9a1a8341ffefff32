"""`cpctl dev`: the whole stack on one machine, started and supervised by one process.

Start order: Temporal, PostgreSQL, Redis (each waited for), migrations, then the
application processes (the API and one worker per pool). Each child runs in its own
session, so killing its process group leaves no grandchildren behind. A child that exits
on its own is restarted with exponential back-off. SIGINT/SIGTERM stop the application
processes first and the infrastructure last, in reverse start order; a second signal
kills everything at once.

`<data_dir>/dev-stack.json` describes the running stack (URLs, pids) for tools and tests,
and lets the next start clean up after a supervisor that died without stopping its
children. `<data_dir>/dev.lock` keeps a second supervisor off the same data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

from control_plane.core.config import Settings
from control_plane.devstack.services import (
    EmbeddedPostgres,
    EmbeddedRedis,
    ServiceSpec,
    TemporalDevServer,
    port_in_use,
)
from workflows.queues import ALL_QUEUES

STATE_FILE = "dev-stack.json"
LOCK_FILE = "dev.lock"
# A child that stayed up this long counts as healthy: its next crash restarts quickly.
STABLE_AFTER_SECONDS = 60.0
APP_STOP_SECONDS = 15.0
API_READY_TIMEOUT_SECONDS = 120.0
MIGRATION_TIMEOUT_SECONDS = 300.0
EXTERNAL_TEMPORAL_TIMEOUT_SECONDS = 15.0
_LOG_TAIL_BYTES = 16_000
_LOG_TAIL_LINES = 30

Kind = Literal["infrastructure", "application"]


def say(message: str) -> None:
    """One concise line on the supervisor's stdout; the details live in the log files."""
    print(f"{time.strftime('%H:%M:%S')} dev  {message}", flush=True)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def last_lines(text: str, count: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])


async def _answers_ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            response = await client.get(url)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def hide_password(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def kill_group(pgid: int) -> None:
    # Children are session leaders, so their pid is also their process group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _always_ready() -> bool:
    return True


class StartupError(Exception):
    """The stack cannot start; the message tells the developer why."""


class Interrupted(Exception):
    """A stop was requested while something was still starting."""


@dataclass(frozen=True)
class PortClaim:
    port: int
    what: str
    setting: str
    host: str = "127.0.0.1"

    def describe(self) -> str:
        return f"port {self.port} ({self.what}, {self.setting})"


@dataclass
class Planned:
    spec: ServiceSpec
    kind: Kind
    ports: list[PortClaim] = field(default_factory=list)


class Child:
    """One supervised process: spawn, readiness, restart with back-off, stop."""

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        kind: Kind,
        stopping: asyncio.Event,
        backoff: tuple[float, float],
        on_change: Callable[[], None],
    ) -> None:
        if spec.log_file is None:
            raise ValueError(f"{spec.name}: every supervised child needs a log file")
        self.spec = spec
        self.kind = kind
        self.log_file: Path = spec.log_file
        self.process: asyncio.subprocess.Process | None = None
        self.create_time: float | None = None
        self.restarts = 0
        self._ready_at: float | None = None
        self._started_at = 0.0
        self._stopping = stopping
        self._backoff_min, self._backoff_max = backoff
        self._on_change = on_change
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def _process(self) -> asyncio.subprocess.Process:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pid": self.process.pid if self.process else None,
            "create_time": self.create_time,
            "restarts": self.restarts,
            "stop_signal": self.spec.stop_signal,
            "log": str(self.log_file),
        }

    def log_tail(self) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                tail = log.read().decode(errors="replace")
        except OSError:
            return ""
        return f"--- last lines of {self.log_file} ---\n{last_lines(tail)}"

    async def spawn(self) -> None:
        try:
            await asyncio.to_thread(self.spec.prepare)
        except subprocess.CalledProcessError as err:
            output = (err.stderr or err.stdout or b"").decode(errors="replace").strip()
            raise StartupError(f"{self.name}: {shlex.join(err.cmd)} failed\n{output}") from err
        except OSError as err:
            raise StartupError(f"{self.name}: cannot prepare its data: {err}") from err
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            header = f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} cpctl dev starts {self.name}: "
            log.write(f"{header}{shlex.join(self.spec.argv)}\n".encode())
            log.flush()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.spec.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **self.spec.env},
                    user=self.spec.user,
                    cwd=self.spec.cwd,
                    start_new_session=True,
                )
            except OSError as err:
                raise StartupError(f"{self.name}: cannot run {self.spec.argv[0]}: {err}") from err
        self._started_at = asyncio.get_running_loop().time()
        self._ready_at = None
        try:
            self.create_time = psutil.Process(self.process.pid).create_time()
        except psutil.Error:
            self.create_time = None
        verb = "restarted" if self.restarts else "started"
        say(f"{self.name} {verb} (pid {self.process.pid}), log {self.log_file.name}")
        self._on_change()

    async def wait_ready(self) -> None:
        process = self._process()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.ready_timeout
        while not await self.spec.ready():
            if self._stopping.is_set():
                raise Interrupted
            if process.returncode is not None:
                raise StartupError(
                    f"{self.name} exited with {describe_exit(process.returncode)} before it was"
                    f" ready\n{self.log_tail()}"
                )
            if loop.time() > deadline:
                raise StartupError(
                    f"{self.name} was not ready after {self.spec.ready_timeout:g} s\n"
                    f"{self.log_tail()}"
                )
            await asyncio.sleep(0.2)
        if self.spec.after_ready is not None:
            try:
                await self.spec.after_ready()
            except Exception as err:  # whatever it raised, the child is not usable yet
                raise StartupError(f"{self.name}: set-up after start failed: {err!r}") from err
        self._ready_at = loop.time()

    async def start(self) -> None:
        await self.spawn()
        await self.wait_ready()

    def supervise(self) -> None:
        """Keep the child running (in the background) until the stack stops."""
        self._supervisor = asyncio.create_task(self._keep_running(), name=f"keep-{self.name}")
        self._supervisor.add_done_callback(self._report_failure)

    def _report_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            error(
                f"supervising {self.name} failed, it is no longer restarted: {task.exception()!r}"
            )

    async def _keep_running(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._backoff_min
        while True:
            process = self._process()
            if not await self._exited_before_stop(process):
                return
            uptime = loop.time() - self._started_at
            if self._ready_at is not None and loop.time() - self._ready_at >= STABLE_AFTER_SECONDS:
                backoff = self._backoff_min
            say(
                f"{self.name} (pid {process.pid}) exited with"
                f" {describe_exit(process.returncode or 0)} after {uptime:.1f} s;"
                f" restarting in {backoff:g} s (see {self.log_file.name})"
            )
            kill_group(process.pid)
            while True:
                if await self._stop_requested_within(backoff):
                    return
                backoff = min(backoff * 2, self._backoff_max)
                self.restarts += 1
                try:
                    await self.start()
                    break
                except Interrupted:
                    return
                except StartupError as err:
                    say(
                        f"{self.name} failed to come back ({str(err).splitlines()[0]});"
                        f" retrying in {backoff:g} s"
                    )
                    if self.process is not None and self.process.returncode is None:
                        kill_group(self.process.pid)
                        await self.process.wait()

    async def _exited_before_stop(self, process: asyncio.subprocess.Process) -> bool:
        exited = asyncio.ensure_future(process.wait())
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        stop.cancel()
        return process.returncode is not None and not self._stopping.is_set()

    async def _stop_requested_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop signal, then SIGKILL of the group after `spec.stop_timeout`. Stack stopping."""
        if self._supervisor is not None:
            # Returns promptly once `stopping` is set; afterwards nothing respawns the child.
            await asyncio.gather(self._supervisor, return_exceptions=True)
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, self.spec.stop_signal)
            try:
                await asyncio.wait_for(process.wait(), self.spec.stop_timeout)
            except TimeoutError:
                say(f"{self.name} did not stop within {self.spec.stop_timeout:g} s; killing it")
                kill_group(process.pid)
                await process.wait()
            say(f"{self.name} stopped ({describe_exit(process.returncode or 0)})")
        kill_group(process.pid)

    def kill_now(self) -> None:
        if self.process is not None and self.process.returncode is None:
            kill_group(self.process.pid)


class DevStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.expanduser().resolve()
        self.logs_dir = self.data_dir / "logs"
        self.bootstrap_line: str | None = None
        self.cluster_line: str | None = None
        self.state_file = self.data_dir / STATE_FILE
        self.stopping = asyncio.Event()
        self.status = "starting"
        self.children: list[Child] = []
        self.temporal = (
            None
            if _temporal_address_given(settings)
            else TemporalDevServer(
                self.data_dir,
                port=settings.dev.temporal_port,
                ui_port=settings.dev.temporal_ui_port,
            )
        )
        self.postgres = (
            None if settings.database.url.get_secret_value() else EmbeddedPostgres(self.data_dir)
        )
        self.redis = None if settings.redis.url.get_secret_value() else EmbeddedRedis(self.data_dir)

    # --- what runs ------------------------------------------------------------------

    def plan(self) -> list[Planned]:
        return self._infrastructure() + self._applications()

    def _infrastructure(self) -> list[Planned]:
        planned: list[Planned] = []
        if self.temporal is not None:
            spec = self.temporal.spec()
            if self.settings.temporal.namespace != "default":
                spec.argv += ["--namespace", self.settings.temporal.namespace]
            ports = [PortClaim(self.temporal.port, "Temporal frontend", "CP_DEV__TEMPORAL_PORT")]
            if self.temporal.ui_port:
                ports.append(
                    PortClaim(self.temporal.ui_port, "Temporal UI", "CP_DEV__TEMPORAL_UI_PORT")
                )
            planned.append(Planned(spec, "infrastructure", ports))
        if self.postgres is not None:
            planned.append(Planned(self.postgres.spec(), "infrastructure"))
        if self.redis is not None:
            planned.append(Planned(self.redis.spec(), "infrastructure"))
        return planned

    def _applications(self) -> list[Planned]:
        """Every application process of the stack."""
        cli = [sys.executable, "-m", "control_plane.cli"]
        env = self.child_env()
        api = ServiceSpec(
            name="api",
            argv=[*cli, "api"],
            ready=self._api_ready,
            env=env,
            log_file=self.logs_dir / "api.log",
            stop_timeout=APP_STOP_SECONDS,
            ready_timeout=API_READY_TIMEOUT_SECONDS,
        )
        api_port = PortClaim(self.settings.api.port, "API", "CP_API__PORT", self.settings.api.host)
        planned = [Planned(api, "application", [api_port])]
        gateway = ServiceSpec(
            name="gateway",
            argv=[*cli, "gateway"],
            ready=self._gateway_ready,
            env=env,
            log_file=self.logs_dir / "gateway.log",
            stop_timeout=APP_STOP_SECONDS,
            ready_timeout=API_READY_TIMEOUT_SECONDS,
        )
        gateway_port = PortClaim(
            self.settings.gateway.port, "gateway", "CP_GATEWAY__PORT", self.settings.gateway.host
        )
        planned.append(Planned(gateway, "application", [gateway_port]))
        # A stopping worker gives running activities their graceful window; let it finish.
        worker_stop = max(APP_STOP_SECONDS, self.settings.worker.graceful_shutdown_seconds + 5)
        for queue in ALL_QUEUES:
            worker = ServiceSpec(
                name=f"worker-{queue.value}",
                argv=[*cli, "worker", "--queue", queue.value],
                ready=_always_ready,
                env=env,
                log_file=self.logs_dir / f"worker-{queue.value}.log",
                stop_timeout=worker_stop,
            )
            planned.append(Planned(worker, "application"))
        return planned

    # --- addresses ------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        host = self.settings.api.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.settings.api.port}"

    @property
    def gateway_url(self) -> str:
        host = self.settings.gateway.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.settings.gateway.port}"

    @property
    def temporal_address(self) -> str:
        return self.temporal.address if self.temporal else self.settings.temporal.address

    @property
    def database_url(self) -> str:
        if self.postgres is not None:
            return self.postgres.url()
        return self.settings.database.url.get_secret_value()

    @property
    def redis_url(self) -> str:
        if self.redis is not None:
            return self.redis.url
        return self.settings.redis.url.get_secret_value()

    def child_env(self) -> dict[str, str]:
        return {
            "CP_DATA_DIR": str(self.data_dir),
            "CP_DATABASE__URL": self.database_url,
            "CP_REDIS__URL": self.redis_url,
            "CP_TEMPORAL__ADDRESS": self.temporal_address,
            "CP_API__HOST": self.settings.api.host,
            "CP_API__PORT": str(self.settings.api.port),
            "CP_GATEWAY__HOST": self.settings.gateway.host,
            "CP_GATEWAY__PORT": str(self.settings.gateway.port),
            "PYTHONUNBUFFERED": "1",
        }

    def urls(self) -> dict[str, str | None]:
        temporal_ui = None
        if self.temporal is not None and self.temporal.ui_port:
            temporal_ui = f"http://{self.temporal.host}:{self.temporal.ui_port}"
        postgres = self.postgres.dsn() if self.postgres else hide_password(self.database_url)
        return {
            "api": self.api_url,
            "api_docs": f"{self.api_url}/docs",
            "readiness": f"{self.api_url}/readyz",
            "health": f"{self.api_url}/healthz",
            "metrics": f"{self.api_url}/metrics",
            "gateway": f"{self.gateway_url}/v1",
            "temporal_ui": temporal_ui,
            "temporal_address": self.temporal_address,
            "temporal_namespace": self.settings.temporal.namespace,
            "postgres": postgres,
            "database_url": hide_password(self.database_url),
            "redis": hide_password(self.redis_url),
        }

    async def _api_ready(self) -> bool:
        return await _answers_ready(f"{self.api_url}/readyz")

    async def _gateway_ready(self) -> bool:
        return await _answers_ready(f"{self.gateway_url}/readyz")

    # --- life cycle -----------------------------------------------------------------

    async def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        if lock is None:
            return 2
        try:
            self._stop_leftovers()
            plan = self.plan()
            busy = [
                claim
                for item in plan
                for claim in item.ports
                if port_in_use(claim.port, claim.host)
            ]
            if busy:
                for claim in busy:
                    error(
                        f"{claim.describe()} is already in use; stop whatever listens there or"
                        f" set {claim.setting} to a free port"
                    )
                return 2
            self._handle_signals(install=True)
            try:
                return await self._run_until_stopped(plan)
            finally:
                self.stopping.set()
                await self._stop_all()
                self._handle_signals(install=False)
                self.state_file.unlink(missing_ok=True)
        finally:
            lock.close()

    async def _run_until_stopped(self, plan: list[Planned]) -> int:
        loop = asyncio.get_running_loop()
        began = loop.time()
        say(f"starting the dev stack in {self.data_dir}")
        self._write_state()
        try:
            await self._start(plan)
        except Interrupted:
            say("stop requested during start-up")
            return 0
        except StartupError as err:
            error(str(err))
            return 1
        self.status = "ready"
        self._write_state()
        self._print_banner(loop.time() - began)
        await self.stopping.wait()
        return 0

    def _add(self, item: Planned) -> Child:
        child = Child(
            item.spec,
            kind=item.kind,
            stopping=self.stopping,
            backoff=(self.settings.dev.restart_min_seconds, self.settings.dev.restart_max_seconds),
            on_change=self._write_state,
        )
        self.children.append(child)
        return child

    async def _start(self, plan: list[Planned]) -> None:
        for item in plan:
            if item.kind == "infrastructure":
                child = self._add(item)
                await child.start()
                child.supervise()
        if self.temporal is None:
            await self._check_external_temporal()
        await self._migrate()
        await self._bootstrap()
        await self._onboard_local_cluster()
        apps = [self._add(item) for item in plan if item.kind == "application"]
        for child in apps:
            await child.spawn()
        await asyncio.gather(*(child.wait_ready() for child in apps))
        for child in apps:
            child.supervise()

    async def _check_external_temporal(self) -> None:
        from control_plane.core.temporal import connect

        try:
            await asyncio.wait_for(
                connect(self.settings.temporal), EXTERNAL_TEMPORAL_TIMEOUT_SECONDS
            )
        except Exception as err:  # any failure to connect means the same thing here
            raise StartupError(
                f"cannot reach Temporal at {self.temporal_address} (CP_TEMPORAL__ADDRESS): {err}"
            ) from err

    async def _migrate(self) -> None:
        say("applying database migrations (cpctl db upgrade)")
        text = await self._one_shot("migrations", ["db", "upgrade"])
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with (self.logs_dir / "migrations.log").open("a") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} cpctl db upgrade\n{text}")

    async def _bootstrap(self) -> None:
        # Its output carries a one-time password: shown in the banner, never written to a log.
        text = await self._one_shot("bootstrap", ["bootstrap"])
        self.bootstrap_line = next(
            (line.strip() for line in text.splitlines() if line.startswith("bootstrap admin:")),
            None,
        )

    async def _onboard_local_cluster(self) -> None:
        # Started before the workers: the workflow waits on its task queue until they poll.
        text = await self._one_shot("local cluster onboarding", ["clusters", "onboard-local"])
        self.cluster_line = next(
            (line.strip() for line in text.splitlines() if line.startswith("local cluster:")),
            None,
        )

    async def _one_shot(self, label: str, args: list[str]) -> str:
        """Run `cpctl <args>` to completion with the children's environment; its output."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control_plane.cli",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **self.child_env()},
            start_new_session=True,
        )
        output = asyncio.ensure_future(process.communicate())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait(
            {output, stop}, timeout=MIGRATION_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        stop.cancel()
        if not output.done():
            kill_group(process.pid)
            await asyncio.gather(output, return_exceptions=True)
            if self.stopping.is_set():
                raise Interrupted
            raise StartupError(f"{label} did not finish within {MIGRATION_TIMEOUT_SECONDS:g} s")
        text = (output.result()[0] or b"").decode(errors="replace")
        if process.returncode != 0:
            raise StartupError(
                f"{label} failed with {describe_exit(process.returncode or 0)}:\n{last_lines(text)}"
            )
        return text

    async def _stop_all(self) -> None:
        self.status = "stopping"
        self._write_state()
        apps = [child for child in self.children if child.kind == "application"]
        infra = [child for child in self.children if child.kind == "infrastructure"]
        if apps:
            say("stopping the application processes")
            await asyncio.gather(*(child.stop() for child in apps), return_exceptions=True)
        for child in reversed(infra):
            try:
                await child.stop()
            except Exception as err:  # keep stopping the others whatever went wrong here
                error(f"stopping {child.name} failed: {err!r}")
        if self.children:
            say("everything stopped")

    def _handle_signals(self, *, install: bool) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if install:
                loop.add_signal_handler(signum, self._on_signal, signum)
            else:
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if not self.stopping.is_set():
            say(f"{signal.Signals(signum).name} received: stopping (again to kill everything now)")
            self.stopping.set()
            return
        say("killing every process now")
        for child in self.children:
            child.kill_now()

    # --- files ----------------------------------------------------------------------

    def _lock(self) -> IO[str] | None:
        handle = (self.data_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            error(
                f"another `cpctl dev` (pid {holder}) is already running on {self.data_dir};"
                " stop it first, or set CP_DATA_DIR to use another data directory"
            )
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def _stop_leftovers(self) -> None:
        """Stop the children of a supervisor that died without stopping them (kill -9)."""
        try:
            state = json.loads(self.state_file.read_text())
            recorded = dict(state["children"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        leftovers: list[tuple[psutil.Process, int]] = []
        for info in recorded.values():
            try:
                process = psutil.Process(info["pid"])
                # The same pid with another start time is an unrelated, newer process.
                if process.create_time() != info["create_time"]:
                    continue
                leftovers.append((process, int(info.get("stop_signal", signal.SIGTERM))))
            except (psutil.Error, KeyError, TypeError, ValueError):
                continue
        if not leftovers:
            return
        say(f"stopping {len(leftovers)} processes left over by a previous run that did not stop")
        for process, signum in leftovers:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)
        _, alive = psutil.wait_procs([process for process, _ in leftovers], timeout=15)
        for process, _ in leftovers:
            kill_group(process.pid)
        psutil.wait_procs(alive, timeout=5)

    def _write_state(self) -> None:
        state = {
            "status": self.status,
            "supervisor_pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "logs_dir": str(self.logs_dir),
            "urls": self.urls(),
            "children": {child.name: child.describe() for child in self.children},
        }
        partial = self.state_file.with_name(f".{STATE_FILE}.partial")
        partial.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(partial, self.state_file)

    def _print_banner(self, seconds: float) -> None:
        urls = self.urls()
        external = " (external)"
        rows = [
            ("API", urls["api"]),
            ("API docs", urls["api_docs"]),
            ("Readiness", urls["readiness"]),
            ("Gateway", f"{urls['gateway']} (OpenAI-compatible; project API keys)"),
            ("Temporal UI", urls["temporal_ui"] or "(not started: external Temporal)"),
            (
                "Temporal",
                f"{urls['temporal_address']} (namespace {urls['temporal_namespace']})"
                + ("" if self.temporal else external),
            ),
            ("PostgreSQL", f"{urls['postgres']}" + ("" if self.postgres else external)),
            ("Redis", f"{urls['redis']}" + ("" if self.redis else external)),
            ("Workers", ", ".join(queue.value for queue in ALL_QUEUES)),
            ("Data dir", str(self.data_dir)),
            ("Logs", str(self.logs_dir)),
        ]
        lines = [f"control-plane dev stack ready in {seconds:.1f} s"]
        lines += [f"  {label:<12} {value}" for label, value in rows]
        if self.bootstrap_line:
            lines.append(f"  {self.bootstrap_line}")
            lines.append(
                "  (sign in at /docs -> Authorize; change it with POST /api/v1/auth/password)"
            )
        if self.cluster_line:
            lines.append(f"  {self.cluster_line}")
        lines.append("Ctrl-C stops everything.")
        rule = "-" * max(len(line) for line in lines)
        print("\n".join([rule, *lines, rule]), flush=True)


def _temporal_address_given(settings: Settings) -> bool:
    return "temporal" in settings.model_fields_set and (
        "address" in settings.temporal.model_fields_set
    )


def run_dev(settings: Settings) -> int:
    """Run the stack until SIGINT/SIGTERM; 0 after a clean stop, 1 or 2 when it can't start."""
    return asyncio.run(DevStack(settings).run())
