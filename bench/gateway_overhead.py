"""What the gateway adds to a request, side by side in one run: straight to the simulator
vs through our gateway (`cpctl gateway`, one process) vs through LiteLLM's proxy (one
worker), against the same simulator with zero latency, at the same concurrency.

For every cell (target x concurrency 1/16/64 x streaming or not) a separate load
generator process (`bench/gateway_loadgen.py`, aiohttp, closed loop, keep-alive) runs
`--warmup` + `--seconds`. Reported per cell: requests/s, latency p50/p99 (time to the
last byte; for streams also TTFT), the latency added over the direct cell, the gateway's
own `x-cp-overhead-ms` and the CPU milliseconds per request of every process on the
path (proxy, simulator, load generator): on a 2-core machine where the load generator,
the proxy and the simulator all compete for the cores, CPU per request is the cleanest
figure of what one request costs, and `1000 / proxy_cpu_ms` the requests/s one core
would give the proxy alone.

Targets:
* `direct`: the simulator itself (the baseline);
* `gateway`: the real `cpctl gateway` process, an API key without limits (no Redis on
  the request path);
* `gateway_limits`: the same process, an API key with (never reached) RPM and TPM
  limits, so every request reserves and settles in Redis;
* `litellm`: LiteLLM's proxy (`litellm[proxy]`, pinned below) in its own virtual
  environment (`.bench-venvs/litellm`, made on first use), routing the same model name to
  the simulator as an OpenAI-compatible upstream, no database, local cost map.

Everything is real: embedded PostgreSQL and Redis (the gateway's routing table is loaded
from real rows: tenant, project, API key, a running published endpoint with one ready
replica whose URL is the simulator), the gateway as `python -m control_plane.cli gateway`.

    .venv/bin/python bench/gateway_overhead.py
    .venv/bin/python bench/gateway_overhead.py --max-load 1.5 --wait-load-s 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from control_plane.cli import alembic_config  # noqa: E402
from control_plane.core.config import DatabaseSettings  # noqa: E402
from control_plane.core.db import create_engine, create_sessionmaker, session_scope  # noqa: E402
from control_plane.core.security import new_secret, sha256_hex  # noqa: E402
from control_plane.devstack.services import (  # noqa: E402
    EmbeddedPostgres,
    EmbeddedRedis,
    RunningService,
    free_port,
    start_service,
)
from control_plane.endpoints.tables import Endpoint, EndpointReplica  # noqa: E402
from control_plane.identity.authn import API_KEY_MARK, API_KEY_PREFIX_CHARS  # noqa: E402
from control_plane.identity.tables import ApiKey, Project, Tenant  # noqa: E402
from workflows.contracts.endpoints import EndpointStatus, ReplicaState  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "gateway_overhead.json"
LOADGEN = BENCH / "gateway_loadgen.py"
LITELLM_VENV = ROOT / ".bench-venvs" / "litellm"
# Pinned: the version the reference figures were measured with.
LITELLM_VERSION = "1.108.7"
MODEL = "bench-sim"
TARGETS = ("direct", "gateway", "gateway_limits", "litellm")
# Never reached in a run: the limits are there to put the Redis limiter on the path.
RPM_LIMIT, TPM_LIMIT = 1_000_000_000, 2_000_000_000
GOALS = {
    "added_p50_ms_at_c1": 1.0,
    "added_p99_ms_at_c16": 5.0,
    "gateway_share_of_direct_rps": 0.5,
    "gateway_times_litellm_rps": 20.0,
}


# --- processes ----------------------------------------------------------------------------


@dataclass
class Processes:
    """Every process this bench starts; each in its own session, so that stopping one
    stops its children too."""

    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in reversed(self.started):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.started.clear()


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_http(
    url: str, process: subprocess.Popen[bytes], log: Path, within: float, expect: int = 200
) -> float:
    """Seconds until `url` answers `expect`; raises with the log tail when the process
    exits or the time is up."""
    started = time.perf_counter()
    with httpx.Client(timeout=2, trust_env=False) as client:
        while True:
            try:
                if client.get(url).status_code == expect:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"exited with {process.returncode}:\n{log_tail(log)}")
            if time.perf_counter() - started > within:
                raise TimeoutError(f"{url} not ready after {within} s:\n{log_tail(log)}")
            time.sleep(0.1)


# --- the system under test ---------------------------------------------------------------


def start_infrastructure(root: Path) -> tuple[list[RunningService], str, str]:
    """Embedded PostgreSQL (migrated) and Redis, as the test suite runs them. No Temporal:
    the gateway connects to it lazily and only needs it to wake an idle endpoint."""
    postgres = EmbeddedPostgres(root / "pg", socket_tag=f"gpg{os.getpid()}")
    redis = EmbeddedRedis(root / "redis", socket_tag=f"grd{os.getpid()}")
    running: list[RunningService] = []
    try:
        for service in (postgres, redis):
            running.append(asyncio.run(start_service(service.spec())))
        from alembic import command

        command.upgrade(alembic_config(postgres.url()), "head")
    except BaseException:
        for started in reversed(running):
            started.stop()
        raise
    return running, postgres.url(), redis.url


def new_api_key() -> tuple[str, str, str]:
    """(whole key, prefix, sha256 of the secret) as `IdentityService` makes them."""
    public = new_secret(16).replace("-", "").replace("_", "")[:API_KEY_PREFIX_CHARS]
    secret = new_secret(32)
    prefix = API_KEY_MARK + public
    return f"{prefix}_{secret}", prefix, sha256_hex(secret)


async def seed(database_url: str, upstream_url: str) -> dict[str, str]:
    """A tenant, a project, two API keys (one with limits) and a running, published
    endpoint whose one ready replica is the simulator. Returns the keys."""
    engine = create_engine(DatabaseSettings(url=database_url, pool_size=2))
    sessions = create_sessionmaker(engine)
    keys: dict[str, str] = {}
    try:
        async with session_scope(sessions) as session:
            tenant = Tenant(slug=f"bench-{uuid.uuid4().hex[:8]}", display_name="Bench")
            session.add(tenant)
            await session.flush()
            project = Project(tenant_id=tenant.id, name="gateway-bench")
            session.add(project)
            await session.flush()
            for name, limited in (("gateway", False), ("gateway_limits", True)):
                whole, prefix, secret_hash = new_api_key()
                session.add(
                    ApiKey(
                        tenant_id=tenant.id,
                        project_id=project.id,
                        name=name,
                        prefix=prefix,
                        secret_hash=secret_hash,
                        scopes=["gateway:write"],
                        rpm_limit=RPM_LIMIT if limited else None,
                        tpm_limit=TPM_LIMIT if limited else None,
                    )
                )
                keys[name] = whole
            endpoint = Endpoint(
                tenant_id=tenant.id,
                project_id=project.id,
                name=MODEL,
                engine="simulator",
                status=EndpointStatus.RUNNING.value,
                published=True,
                published_at=datetime.now(UTC),
                replicas_desired=1,
                replicas_ready=1,
            )
            session.add(endpoint)
            await session.flush()
            session.add(
                EndpointReplica(
                    endpoint_id=endpoint.id,
                    name=f"{MODEL}-0",
                    state=ReplicaState.READY.value,
                    url=upstream_url,
                    observed_at=datetime.now(UTC),
                )
            )
    finally:
        await engine.dispose()
    return keys


def start_simulator(processes: Processes, logs: Path, output_tokens: int) -> tuple[Any, str]:
    port = free_port()
    log = logs / "simulator.log"
    process = processes.start(
        "simulator",
        [sys.executable, "-m", "control_plane.endpoints.engines.simulator", "--port", str(port)]
        + ["--model", MODEL, "--ttft-ms", "0", "--itl-ms", "0"]
        + ["--output-tokens", str(output_tokens)]
        # Admission must never be what limits throughput.
        + ["--max-concurrency", "1024", "--max-queue", "4096"],
        log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process, log, 60)
    return process, url


def start_gateway(
    processes: Processes, logs: Path, root: Path, database_url: str, redis_url: str
) -> tuple[Any, str, float]:
    port = free_port()
    env = {
        **os.environ,
        "CP_ENVIRONMENT": "test",
        "CP_DATA_DIR": str(root / "data"),
        "CP_DATABASE__URL": database_url,
        "CP_REDIS__URL": redis_url,
        # Nothing listens there: the gateway connects lazily, and only a wake needs it.
        "CP_TEMPORAL__ADDRESS": f"127.0.0.1:{free_port()}",
        "CP_AUTH__JWT_SECRET": "bench-" + uuid.uuid4().hex,
        "CP_LOG_LEVEL": "warning",
        "CP_GATEWAY__PORT": str(port),
    }
    log = logs / "gateway.log"
    process = processes.start(
        "gateway",
        [sys.executable, "-m", "control_plane.cli", "gateway", "--port", str(port)]
        + ["--workers", "1"],
        log,
        env,
    )
    url = f"http://127.0.0.1:{port}"
    ready_s = wait_http(f"{url}/readyz", process, log, 120)
    return process, url, ready_s


def litellm_venv(log: Path) -> str:
    """The LiteLLM virtual environment's `litellm`, made (and pinned) on first use."""
    binary = LITELLM_VENV / "bin" / "litellm"
    python = LITELLM_VENV / "bin" / "python"
    if not binary.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        LITELLM_VENV.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            subprocess.run([base, "-m", "venv", str(LITELLM_VENV)], check=True, stdout=out)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
    return str(binary)


def installed_version(python: Path, package: str) -> str | None:
    found = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() or None


def start_litellm(
    processes: Processes, logs: Path, root: Path, upstream_url: str, master_key: str
) -> tuple[Any, str, float]:
    log = logs / "litellm.log"
    binary = litellm_venv(log)
    config = root / "litellm.yaml"
    # JSON is YAML: no YAML writer needed.
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": f"{upstream_url}/v1",
                            "api_key": "bench-dummy",
                        },
                    }
                ],
                "litellm_settings": {"drop_params": True},
            },
            indent=2,
        )
    )
    env = {
        key: value
        for key, value in os.environ.items()
        # No database, no stray config of the caller's.
        if key not in ("DATABASE_URL", "LITELLM_MASTER_KEY", "VIRTUAL_ENV")
    }
    env.update(
        {
            # The setting: the bundled cost map, no fetch from the internet.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            # It refuses to start without one; callers authenticate with it, as with ours.
            "LITELLM_MASTER_KEY": master_key,
            "PATH": f"{LITELLM_VENV / 'bin'}:{os.environ.get('PATH', '')}",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    port = free_port()
    process = processes.start(
        "litellm",
        [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        + ["--num_workers", "1"],
        log,
        env,
    )
    url = f"http://127.0.0.1:{port}"
    ready_s = wait_http(f"{url}/health/liveliness", process, log, 240)
    return process, url, ready_s


def check_answers(url: str, key: str | None) -> None:
    """One plain and one streamed request must come back whole before measuring."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=60, trust_env=False) as client:
        plain = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        if plain.status_code != 200 or not plain.json().get("choices"):
            raise RuntimeError(f"{url}: {plain.status_code} {plain.text[:500]}")
        streamed = client.post(
            f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers
        )
        if streamed.status_code != 200 or b"[DONE]" not in streamed.content:
            raise RuntimeError(f"{url} (stream): {streamed.status_code} {streamed.text[:500]}")


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    key: str | None
    watch: dict[str, int]


def run_cell(
    target: Target, concurrency: int, stream: bool, args: argparse.Namespace
) -> dict[str, Any]:
    argv = [sys.executable, str(LOADGEN), "--url", f"{target.url}/v1/chat/completions"]
    argv += ["--model", MODEL, "--concurrency", str(concurrency)]
    argv += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    if stream:
        argv.append("--stream")
    if target.key:
        argv += ["--key", target.key]
    for name, pid in target.watch.items():
        argv += ["--watch", f"{name}={pid}"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.warmup + args.seconds + 120
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["target"] = target.name
    return result


def wait_for_quiet(max_load: float, wait_s: float) -> tuple[float, float]:
    """Wait (up to `wait_s`) for the 1-minute load average to drop under `max_load`;
    returns (seconds waited, load average then)."""
    started = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - started
        if load < max_load or waited >= wait_s:
            return round(waited, 1), round(load, 2)
        print(f"load average {load:.2f} >= {max_load}: waiting ({waited:.0f}/{wait_s:.0f} s)")
        time.sleep(min(10.0, max(0.1, wait_s - waited)))


def added(cell: dict[str, Any], base: dict[str, Any] | None, group: str) -> dict[str, Any]:
    if base is None or cell.get(group) is None or base.get(group) is None:
        return {}
    out: dict[str, Any] = {}
    for p in ("p50_ms", "p99_ms"):
        mine, theirs = cell[group].get(p), base[group].get(p)
        if mine is not None and theirs is not None:
            out[p] = round(mine - theirs, 3)
    return out


def summarise(cells: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Added latency per cell, best requests/s per target and mode, the ratios."""
    by = {(c["target"], c["stream"], c["concurrency"]): c for c in cells}
    for cell in cells:
        base = by.get(("direct", cell["stream"], cell["concurrency"]))
        if cell["target"] != "direct":
            cell["added_latency_ms"] = added(cell, base, "latency")
            if cell["stream"]:
                cell["added_ttft_ms"] = added(cell, base, "ttft")
    summary: dict[str, Any] = {}
    for stream in (False, True):
        mode = "stream" if stream else "non_stream"
        best: dict[str, float] = {}
        cpu: dict[str, float | None] = {}
        for target in TARGETS:
            mine = [by[(target, stream, c)] for c in concurrencies if (target, stream, c) in by]
            if not mine:
                continue
            best[target] = max(c["rps"] for c in mine)
            proxy = [
                c["cpu_ms_per_request"].get("proxy")
                for c in mine
                if c["cpu_ms_per_request"].get("proxy") is not None
            ]
            cpu[target] = round(min(proxy), 4) if proxy else None
        upstream = [
            c["cpu_ms_per_request"].get("upstream")
            for c in cells
            if c["stream"] == stream and c["cpu_ms_per_request"].get("upstream")
        ]
        upstream_cpu = round(min(upstream), 4) if upstream else None
        summary[mode] = {
            "max_rps": best,
            "proxy_cpu_ms_per_request_min": cpu,
            "upstream_cpu_ms_per_request_min": upstream_cpu,
            # Machine-independent form of "one gateway process sustains >= 50 % of the
            # upstream's requests/s": each with one core of its own.
            "gateway_one_core_share_of_upstream_one_core": ratio(upstream_cpu, cpu.get("gateway")),
            "gateway_share_of_direct_rps": ratio(best.get("gateway"), best.get("direct")),
            "gateway_limits_share_of_direct_rps": ratio(
                best.get("gateway_limits"), best.get("direct")
            ),
            "gateway_times_litellm_rps": ratio(best.get("gateway"), best.get("litellm")),
            "gateway_times_litellm_cpu_per_request": ratio(cpu.get("litellm"), cpu.get("gateway")),
            "one_core_capacity_rps": {
                name: round(1000 / value, 0) for name, value in cpu.items() if value
            },
        }
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def judge(
    cells: list[dict[str, Any]], summary: dict[str, Any], has_litellm: bool
) -> dict[str, Any]:
    def gateway_cell(stream: bool, concurrency: int) -> dict[str, Any]:
        for cell in cells:
            if (cell["target"], cell["stream"], cell["concurrency"]) == (
                "gateway",
                stream,
                concurrency,
            ):
                return cell
        return {}

    def per_mode(concurrency: int, p: str, goal: float) -> dict[str, Any]:
        values = {
            ("stream" if s else "non_stream"): gateway_cell(s, concurrency)
            .get("added_latency_ms", {})
            .get(p)
            for s in (False, True)
        }
        ok = all(v is not None and v <= goal for v in values.values())
        return {"goal_ms": goal, "measured_ms": values, "pass": ok}

    def share(key: str, goal: float) -> dict[str, Any]:
        values = {mode: summary[mode][key] for mode in ("non_stream", "stream")}
        ok = all(v is not None and v >= goal for v in values.values())
        return {"goal": goal, "measured": values, "pass": ok}

    litellm = share("gateway_times_litellm_rps", GOALS["gateway_times_litellm_rps"])
    if not has_litellm:
        litellm = {**litellm, "pass": None, "why": "LiteLLM did not run"}
    return {
        "added_p50_at_concurrency_1": per_mode(1, "p50_ms", GOALS["added_p50_ms_at_c1"]),
        "added_p99_at_concurrency_16": per_mode(16, "p99_ms", GOALS["added_p99_ms_at_c16"]),
        "gateway_rps_share_of_direct": share(
            "gateway_share_of_direct_rps", GOALS["gateway_share_of_direct_rps"]
        ),
        "gateway_rps_times_litellm": litellm,
    }


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    header = (
        f"{'mode':<10} {'c':>3} {'target':<15} {'rps':>8} {'p50':>8} {'p99':>8} {'ttft50':>7}"
        f" {'+p50':>7} {'+p99':>7} {'ovh50':>6} {'proxy':>7} {'sim':>6} {'lgen':>6} {'redis':>6}"
        " err"
    )
    print("\nlatency in ms; +p50/+p99: added over direct; ovh50: x-cp-overhead-ms median;")
    print("proxy/sim/lgen/redis: CPU ms per request of the proxy, the simulator, the load")
    print("generator and Redis (watched for gateway_limits only)")
    print(header)
    print("-" * len(header))
    for cell in report["cells"]:
        lat, more = cell["latency"], cell.get("added_latency_ms", {})
        cpu = cell["cpu_ms_per_request"]
        errors = sum(cell["errors"].values())
        print(
            f"{'stream' if cell['stream'] else 'plain':<10} {cell['concurrency']:>3}"
            f" {cell['target']:<15} {cell['rps']:>8.1f} {fmt(lat['p50_ms']):>8}"
            f" {fmt(lat['p99_ms']):>8} {fmt(cell.get('ttft', {}).get('p50_ms')):>7}"
            f" {fmt(more.get('p50_ms')):>7} {fmt(more.get('p99_ms')):>7}"
            f" {fmt(cell.get('reported_overhead', {}).get('p50_ms'), 3):>6}"
            f" {fmt(cpu.get('proxy'), 3):>7} {fmt(cpu.get('upstream'), 3):>6}"
            f" {fmt(cpu.get('loadgen'), 3):>6} {fmt(cpu.get('redis'), 3):>6} {errors or ''}"
        )
    print()
    for mode, summary in report["summary"].items():
        print(f"{mode}: max rps {summary['max_rps']}")
        print(
            f"  gateway/direct {fmt(summary['gateway_share_of_direct_rps'], 3)},"
            f" gateway_limits/direct {fmt(summary['gateway_limits_share_of_direct_rps'], 3)},"
            f" gateway/litellm {fmt(summary['gateway_times_litellm_rps'], 1)}x (rps),"
            f" {fmt(summary['gateway_times_litellm_cpu_per_request'], 1)}x (CPU per request)"
        )
        print(
            f"  one-core capacity from CPU per request: {summary['one_core_capacity_rps']},"
            f" simulator {fmt(1000 / summary['upstream_cpu_ms_per_request_min'], 0)}"
            if summary["upstream_cpu_ms_per_request_min"]
            else f"  one-core capacity from CPU per request: {summary['one_core_capacity_rps']}"
        )
    print()
    for name, goal in report["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[goal["pass"]]
        measured = goal.get("measured_ms", goal.get("measured"))
        print(f"{verdict:<5} {name}: {measured} (goal {goal.get('goal_ms', goal.get('goal'))})")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("aiohttp", "uvicorn", "uvloop", "httptools", "control-plane"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def measure(args: argparse.Namespace) -> dict[str, Any]:
    waited, load_before = wait_for_quiet(args.max_load, args.wait_load_s)
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="cp-gw-bench-"))
    logs = root / "logs"
    logs.mkdir()
    processes = Processes()
    infrastructure: list[RunningService] = []
    litellm: dict[str, Any] = {"ran": False}
    report: dict[str, Any] = {}
    try:
        infrastructure, database_url, redis_url = start_infrastructure(root)
        simulator, upstream = start_simulator(processes, logs, args.output_tokens)
        keys = asyncio.run(seed(database_url, upstream))
        gateway, gateway_url, gateway_ready_s = start_gateway(
            processes, logs, root, database_url, redis_url
        )
        check_answers(upstream, None)
        check_answers(gateway_url, keys["gateway"])
        check_answers(gateway_url, keys["gateway_limits"])
        targets = [
            Target("direct", upstream, None, {"upstream": simulator.pid}),
            Target("gateway", gateway_url, keys["gateway"], {"proxy": gateway.pid}),
            Target("gateway_limits", gateway_url, keys["gateway_limits"], {"proxy": gateway.pid}),
        ]
        for target in targets[1:]:
            target.watch["upstream"] = simulator.pid
        # The limiter's other half: Redis runs the reserve and settle scripts.
        targets[2].watch["redis"] = infrastructure[1].process.pid
        if not args.skip_litellm:
            try:
                master_key = "sk-" + new_secret(32).encode().hex()[:64]
                process, litellm_url, ready_s = start_litellm(
                    processes, logs, root, upstream, master_key
                )
                check_answers(litellm_url, master_key)
                litellm = {
                    "ran": True,
                    "version": installed_version(LITELLM_VENV / "bin" / "python", "litellm"),
                    "ready_s": round(ready_s, 1),
                    "venv": str(LITELLM_VENV.relative_to(ROOT)),
                    "command": "litellm --config CONFIG --num_workers 1",
                    "env": {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
                    "config": "model openai/<name>, api_base = the simulator, dummy api_key,"
                    " drop_params, no database; callers send the master key",
                }
                targets.append(Target("litellm", litellm_url, master_key, {"proxy": process.pid}))
                targets[-1].watch["upstream"] = simulator.pid
            except Exception as err:
                litellm = {"ran": False, "error": f"{type(err).__name__}: {err}"[-3000:]}
                print(f"LiteLLM is left out: {litellm['error']}")
        else:
            litellm = {"ran": False, "error": "--skip-litellm"}

        cells: list[dict[str, Any]] = []
        # Side by side: every target runs each (mode, concurrency) cell back to back, so
        # that whatever else loads the machine meanwhile hits them alike.
        for stream in (False, True):
            for concurrency in args.concurrency:
                for target in targets:
                    cell = run_cell(target, concurrency, stream, args)
                    cells.append(cell)
                    lat = cell["latency"]
                    print(
                        f"{'stream' if stream else 'plain':<7} c={concurrency:<3}"
                        f" {target.name:<15} {cell['rps']:>8.1f} req/s"
                        f"  p50 {fmt(lat['p50_ms'])} ms  p99 {fmt(lat['p99_ms'])} ms"
                        f"  proxy CPU {fmt(cell['cpu_ms_per_request'].get('proxy'), 3)} ms/req"
                        + (f"  errors {cell['errors']}" if cell["errors"] else "")
                    )
        memory = {}
        for name, process in processes.started:
            try:
                memory[name] = round(psutil.Process(process.pid).memory_info().rss / 2**20, 1)
            except psutil.Error:
                pass
        summary = summarise(cells, args.concurrency)
        report = {
            "benchmark": "gateway_overhead",
            "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                "load_average_1m_at_start": load_before,
                "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
                "waited_for_quiet_s": waited,
                "max_load_asked": args.max_load,
            },
            "versions": {**versions(), "litellm": litellm.get("version")},
            "setup": {
                "upstream": f"simulator, ttft=itl=0, {args.output_tokens} output tokens,"
                " chat completions (plain JSON or SSE)",
                "gateway": "python -m control_plane.cli gateway --workers 1 (uvicorn,"
                " uvloop, httptools), routing table from PostgreSQL, limiter in Redis",
                "gateway_ready_s": round(gateway_ready_s, 1),
                "load_generator": "bench/gateway_loadgen.py: its own process, aiohttp on"
                " uvloop, closed loop, one keep-alive connection per concurrent worker",
                "warmup_s": args.warmup,
                "seconds_per_cell": args.seconds,
                "concurrency": args.concurrency,
                "pinning": "none: load generator, proxy and simulator share the 2 cores",
                "rss_mib_at_end": memory,
            },
            "litellm": litellm,
            "cells": cells,
            "summary": summary,
            "goals": GOALS,
            "targets": judge(cells, summary, litellm.get("ran") is True),
            "notes": [
                "added latency = the proxy cell minus the direct cell at the same"
                " concurrency and mode, p50 from p50 and p99 from p99",
                "cpu_ms_per_request: CPU (user+system) of the process and its children"
                " during the measured window divided by the requests finished in it",
                "one_core_capacity_rps = 1000 / the proxy's lowest CPU ms per request:"
                " what one core would serve if the proxy had it alone",
                "on 2 cores the load generator, the proxy and the simulator compete:"
                " requests/s through a proxy is bounded by the machine, not the proxy alone",
                "load_average_at_end counts the bench's own busy processes (load generator,"
                " proxy, simulator): only the load average at the start tells how quiet the"
                " machine was",
                "latency max_ms and reported_overhead.max_ms show pauses of the proxy"
                " process itself (the direct cells have none)",
            ],
            "total_seconds": round(time.perf_counter() - began, 1),
        }
        return report
    finally:
        processes.stop_all()
        for service in reversed(infrastructure):
            service.stop()
        if args.keep_logs:
            print(f"logs kept in {logs}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured, per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="per cell")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64]
    )
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--max-load", type=float, default=1.5, help="1-minute load average")
    parser.add_argument(
        "--wait-load-s", type=float, default=0.0, help="wait this long at most for --max-load"
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = measure(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
