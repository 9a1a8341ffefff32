"""How many short non-streaming chat requests per second the LLM simulator serves on one
core, and at what latency.

The simulator runs as a subprocess pinned to core 0 (`taskset -c 0`) with no simulated
latency (ttft = itl = 0). This process, pinned to the other cores, drives it with
`--connections` concurrent keep-alive connections (httpx, one async client per
connection) for `--seconds` after a short warm-up, each sending `max_tokens: 8` chat
requests back to back. The load generator shares the machine with the server, so the
figure is a floor: with two cores, one is the server's and one the client's.

    .venv/bin/python bench/simulator.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from control_plane.devstack.services import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "simulator.json"
TARGET_RPS = 2000
MODEL = "sim"
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something short about autoscaling."}],
        "max_tokens": 8,
    }
).encode()


def start_server(port: int) -> tuple[subprocess.Popen[bytes], bool]:
    command = [
        sys.executable,
        "-m",
        "control_plane.endpoints.engines.simulator",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--ttft-ms",
        "0",
        "--itl-ms",
        "0",
        # Admission must not be what limits throughput: every connection gets a slot.
        "--max-concurrency",
        "1024",
    ]
    pinned = shutil.which("taskset") is not None
    if pinned:
        command = ["taskset", "-c", "0", *command]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError("simulator exited early")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, pinned
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("simulator not healthy within 30 s")


async def drive(
    port: int, client: str, connections: int, warmup: float, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop = False
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def record(ok: bool, started: float) -> None:
        nonlocal errors
        if measuring:
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    async def httpx_worker() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(limits=limits, timeout=30) as session:
            while not stop:
                started = time.perf_counter()
                try:
                    response = await session.post(url, content=BODY, headers=headers)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                record(ok, started)

    # httpx spends ~0.5 ms of client CPU per request, so one client core cannot offer
    # much more than 2,000 req/s; this bare keep-alive HTTP/1.1 loop can.
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY

    async def raw_worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                record(head.startswith(b"HTTP/1.1 200 "), started)
        finally:
            writer.close()

    worker = raw_worker if client == "raw" else httpx_worker
    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(warmup)
    measuring = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)

    ordered = sorted(latencies)

    def percentile(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": percentile(0.50) if ordered else None,
        "p99_ms": percentile(0.99) if ordered else None,
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2) if ordered else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--client",
        choices=["raw", "httpx", "both"],
        default="both",
        help="load generator: bare asyncio HTTP/1.1, httpx, or each in turn",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    if cpus > 1 and hasattr(os, "sched_setaffinity"):
        # Keep the load generator off the server's core.
        os.sched_setaffinity(0, set(range(1, cpus)))
    clients = ["raw", "httpx"] if args.client == "both" else [args.client]
    results: dict[str, dict[str, Any]] = {}
    pinned = False
    for client in clients:
        # A fresh server per client, so that neither run inherits the other's state.
        port = free_port()
        process, pinned = start_server(port)
        try:
            before = psutil.Process(process.pid).cpu_times()
            result = asyncio.run(drive(port, client, args.connections, args.warmup, args.seconds))
            after = psutil.Process(process.pid).cpu_times()
        finally:
            process.terminate()
            process.wait(10)
        busy = (after.user + after.system) - (before.user + before.system)
        # Share of its core the server used over warm-up plus measurement: well under 1
        # means the client, not the server, set the pace.
        result["server_core_utilisation"] = round(busy / (args.warmup + args.seconds), 2)
        results[client] = result
        print(
            f"{client:>5}: {result['rps']:.0f} req/s over {result['seconds']} s"
            f" ({result['requests']} ok, {result['errors']} errors),"
            f" p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms,"
            f" server core {result['server_core_utilisation']:.0%} busy",
            flush=True,
        )
    best = max(r["rps"] for r in results.values())
    met = best >= TARGET_RPS
    print(f"target {TARGET_RPS} req/s {'met' if met else 'NOT met'} (best {best:.0f} req/s)")
    report = {
        "benchmark": "simulator",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": cpus,
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        },
        "setup": {
            "server": "simulator, ttft=itl=0, max_tokens=8, non-streaming chat",
            "server_pinned_to_core_0": pinned,
            "load_generator": f"{'/'.join(clients)} async, {args.connections} keep-alive"
            f" connections, in this process, on cores 1..{cpus - 1}"
            if cpus > 1
            else f"{'/'.join(clients)} async, sharing the only core with the server",
            "note": f"the load generator shares this {cpus}-core machine with the server;"
            " the result is a floor on what the server alone would sustain",
            "warmup_seconds": args.warmup,
        },
        "results_by_client": results,
        "best_rps": best,
        "target_rps": TARGET_RPS,
        "target_met": met,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
