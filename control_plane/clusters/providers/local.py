"""The `local` provider: the machine the control plane runs on, used as a cluster.

CPU and memory come from psutil; NVIDIA GPUs from `nvidia-smi`, which is optional: a
machine without the binary simply has no GPUs, and a machine whose driver is broken is
still a usable CPU node whose `reason` says why its GPUs are missing. Every subprocess is
started with an argument vector (never a shell) and awaited with a timeout, so a hung
driver cannot stall the event loop or the activity that called us.

The output parsers are pure functions so they can be tested on captured outputs.

Replica sets (`ReplicaProvider`) are supervised processes kept under `replicas_dir`; the
machinery lives in `local_replicas`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from control_plane.clusters.providers.base import (
    ClusterUnreachable,
    InvalidClusterConfig,
    ProviderError,
)
from control_plane.clusters.providers.local_replicas import LocalReplicas
from workflows.contracts.clusters import (
    AcceleratorInfo,
    ClusterKind,
    ConnectionInfo,
    Inventory,
    NodeInfo,
    Platform,
    PrepareResult,
)
from workflows.contracts.endpoints import ReplicaInfo, ReplicaSetSpec

GPU_QUERY_FIELDS = "index,name,memory.total,memory.used,driver_version"
DEFAULT_COMMAND_TIMEOUT = 10.0
# Even an idle GPU reports some used memory (driver context, display); above this share
# something else is running on it and we must not plan a replica there.
BUSY_MEMORY_FRACTION = 0.05
_MIB = 1024 * 1024
# nvidia-smi writes these instead of a value it cannot read.
_UNAVAILABLE = re.compile(r"^\[.*\]$|^N/?A$", re.IGNORECASE)
_CUDA_VERSION = re.compile(r"CUDA Version:\s*(\d+(?:\.\d+)*)")
# Long driver errors would bloat the node's reason (shown in lists and stored per check).
_MAX_REASON = 300


def _value(field: str) -> str | None:
    field = field.strip()
    if not field or _UNAVAILABLE.match(field):
        return None
    return field


def _mib(field: str) -> int | None:
    value = _value(field)
    if value is None:
        return None
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return None


def parse_gpu_query(text: str) -> list[AcceleratorInfo]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version
    --format=csv,noheader,nounits` into one `AcceleratorInfo` per GPU model.

    GPUs of the same model and memory size form one group. A GPU counts as allocatable
    when less than `BUSY_MEMORY_FRACTION` of its memory is used, or when its usage is
    unknown ("[N/A]"): refusing such GPUs would make them unplaceable forever, while
    the operator of a local machine knows what runs on it. An unknown total gives
    `memory_mb=0` ("not said"), which placement treats as not judgeable. Lines that are
    not GPU rows (fewer fields) are ignored.
    """
    groups: dict[tuple[str, int], AcceleratorInfo] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 5:
            continue
        # The name is the only free-text field; joining the middle keeps a comma in it.
        name = ",".join(parts[1:-3]).strip()
        if not name:
            continue
        total = _mib(parts[-3]) or 0
        used = _mib(parts[-2])
        driver = _value(parts[-1])
        free = used is None or total == 0 or used < total * BUSY_MEMORY_FRACTION
        key = (name, total)
        group = groups.get(key)
        if group is None:
            groups[key] = AcceleratorInfo(
                vendor="NVIDIA",
                model=name,
                memory_mb=total,
                count=1,
                allocatable=1 if free else 0,
                driver_version=driver,
            )
        else:
            group.count += 1
            group.allocatable += 1 if free else 0
            group.driver_version = group.driver_version or driver
    return list(groups.values())


def parse_cuda_version(text: str) -> str | None:
    """The CUDA version from the banner of plain `nvidia-smi` ("CUDA Version: 12.4")."""
    match = _CUDA_VERSION.search(text)
    return match.group(1) if match else None


def allocatable_cpu(cpu_cores: int, load_average: float) -> float:
    """Cores not taken by the recent (1-minute) load, to one decimal, never negative."""
    if cpu_cores <= 0:
        return 0.0
    busy = min(max(load_average / cpu_cores, 0.0), 1.0)
    return max(0.0, round(cpu_cores * (1.0 - busy), 1))


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str


async def _run(argv: Sequence[str], time_limit: float) -> _Completed:
    """Run a command without a shell; raises `OSError` when it cannot start and
    `TimeoutError` when it outlives `time_limit` seconds (the child is killed first)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), time_limit)
    except BaseException:
        # On timeout or cancellation, do not leave the child running (nor a zombie).
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(Exception):
            await process.wait()
        raise
    return _Completed(
        returncode=process.returncode if process.returncode is not None else -1,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
    )


def _first_line(*texts: str) -> str:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()[:_MAX_REASON]
    return ""


class LocalProvider:
    """This machine as a one-node cluster.

    `nvidia_smi` is the binary name or path (tests point it at a script); `work_dir` is
    the directory replicas will work in, created by `prepare` when given;
    `replicas_dir` is where replica sets keep their state and logs (without it, the
    replica set methods raise `ProviderError`).
    """

    kind = ClusterKind.LOCAL

    def __init__(
        self,
        *,
        nvidia_smi: str = "nvidia-smi",
        work_dir: Path | None = None,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        replicas_dir: Path | None = None,
    ) -> None:
        self._nvidia_smi = nvidia_smi
        self._work_dir = work_dir
        self._timeout = command_timeout
        self._hostname = socket.gethostname()
        self._replicas = (
            LocalReplicas(replicas_dir, node=self._hostname) if replicas_dir is not None else None
        )

    @property
    def server_url(self) -> str:
        return f"local://{self._hostname}"

    async def connect(self) -> ConnectionInfo:
        return ConnectionInfo(
            server_url=self.server_url,
            platform=Platform.LOCAL,
            version=platform.platform(),
        )

    async def discover(self) -> Inventory:
        connection = await self.connect()
        accelerators, reason = await self._gpus()
        cores = psutil.cpu_count() or os.cpu_count() or 1
        load_1m = psutil.getloadavg()[0]
        memory = psutil.virtual_memory()
        node = NodeInfo(
            name=self._hostname,
            ready=True,
            reason=reason,
            cpu_cores=float(cores),
            memory_mb=memory.total // _MIB,
            allocatable_cpu=allocatable_cpu(cores, load_1m),
            allocatable_memory_mb=memory.available // _MIB,
            labels={"cp/os": platform.system().lower(), "cp/arch": platform.machine()},
            accelerators=accelerators,
        )
        return Inventory(connection=connection, nodes=[node])

    async def _gpus(self) -> tuple[list[AcceleratorInfo], str]:
        """The GPUs and, when nvidia-smi exists but cannot report them, why not."""
        binary = self._nvidia_smi
        query = [binary, f"--query-gpu={GPU_QUERY_FIELDS}", "--format=csv,noheader,nounits"]
        try:
            result = await _run(query, self._timeout)
        except FileNotFoundError:
            return [], ""  # no NVIDIA tooling installed: a CPU-only machine, not a fault
        except TimeoutError:
            return [], f"{binary} did not answer within {self._timeout:g} s; GPUs not listed"
        except OSError as exc:
            return [], f"{binary} could not be started ({exc.strerror or exc}); GPUs not listed"
        if result.returncode != 0:
            detail = _first_line(result.stdout, result.stderr) or "no output"
            return [], f"{binary} failed (exit {result.returncode}): {detail}"
        accelerators = parse_gpu_query(result.stdout)
        if not accelerators:
            return [], ""
        cuda = await self._cuda_version()
        return [gpu.model_copy(update={"cuda_version": cuda}) for gpu in accelerators], ""

    async def _cuda_version(self) -> str | None:
        # The query interface has no CUDA field on every driver; the banner always has it.
        try:
            result = await _run([self._nvidia_smi], self._timeout)
        except (OSError, TimeoutError):
            return None
        return parse_cuda_version(result.stdout) if result.returncode == 0 else None

    async def prepare(self) -> PrepareResult:
        if self._work_dir is None:
            return PrepareResult(created=[], detail="nothing to create on the local machine")
        path = self._work_dir
        try:
            existed = await asyncio.to_thread(_ensure_writable_dir, path)
        except OSError as exc:
            # Retrying will not fix permissions or a file in the way: a configuration error.
            raise InvalidClusterConfig(
                f"work directory {path} is not usable: {exc.strerror or exc}"
            ) from exc
        return PrepareResult(
            created=[] if existed else [str(path)],
            detail=f"work directory {path} ready",
        )

    async def smoke_check(self) -> str:
        python = sys.executable
        if not python:
            raise ClusterUnreachable("no Python interpreter path to start replica processes")
        try:
            result = await _run([python, "-c", "print('ok')"], self._timeout)
        except TimeoutError as exc:
            raise ClusterUnreachable(
                f"a process started with {python} did not finish within {self._timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ClusterUnreachable(
                f"could not start a process with {python}: {exc.strerror or exc}"
            ) from exc
        if result.returncode != 0 or result.stdout.strip() != "ok":
            detail = _first_line(result.stderr, result.stdout) or "no output"
            raise ClusterUnreachable(
                f"a process started with {python} failed (exit {result.returncode}): {detail}"
            )
        return f"started a process with {python}: ok"

    async def teardown(self) -> list[str]:
        # Deliberately removes nothing: replicas are removed by their endpoints before a
        # cluster is deleted, and the work directory may hold user data (downloaded
        # weights, logs) that deleting a cluster record must never destroy.
        return []

    def _replica_sets(self) -> LocalReplicas:
        if self._replicas is None:
            raise ProviderError(
                "this local provider has no replicas directory: it cannot run replica sets"
            )
        return self._replicas

    async def ensure_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        return await self._replica_sets().ensure_replicas(spec)

    async def list_replicas(self, spec: ReplicaSetSpec) -> list[ReplicaInfo]:
        return await self._replica_sets().list_replicas(spec)

    async def delete_replicas(self, name: str) -> list[str]:
        return await self._replica_sets().delete_replicas(name)

    async def replica_logs(self, name: str, replica: str | None, tail: int) -> dict[str, str]:
        return await self._replica_sets().replica_logs(name, replica, tail)


def _ensure_writable_dir(path: Path) -> bool:
    """Create `path` if needed and prove it is writable; returns whether it existed."""
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    # A real write catches read-only mounts and ACLs that permission bits do not show.
    with tempfile.TemporaryFile(dir=path):
        pass
    return existed
