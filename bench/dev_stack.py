"""How fast `cpctl dev` becomes ready, and how much memory the idle stack holds.

For each run: a fresh data directory (cold start: initdb, empty Temporal SQLite, first
migrations), then the same directory again (warm start). "Ready" is the first 200 from
`/readyz`, timed from launching the supervisor. Memory is measured after the stack has
been idle for `--idle-seconds`: the sum over the supervisor and all its descendants of
RSS (counts shared pages once per process, so it overstates) and of PSS (shared pages
split between the processes that map them: the honest total).

    .venv/bin/python bench/dev_stack.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from control_plane.devstack.services import free_ports

RESULTS = Path(__file__).resolve().parent / "results" / "dev_stack.json"
MIB = 1024 * 1024


def _tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def _memory(processes: list[psutil.Process]) -> tuple[int, int]:
    rss = pss = 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def _per_child(data_dir: Path) -> dict[str, float]:
    """PSS MiB of each child's process tree, by child name."""
    state = json.loads((data_dir / "dev-stack.json").read_text())
    result = {}
    for name, child in state["children"].items():
        try:
            _, pss = _memory(_tree(psutil.Process(child["pid"])))
        except psutil.Error:
            continue
        result[name] = round(pss / MIB, 1)
    return result


def measure_start(data_dir: Path, phase: str, idle_seconds: float) -> dict[str, Any]:
    api_port, temporal_port, ui_port = free_ports(3)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CP_")}
    env.update(
        CP_DATA_DIR=str(data_dir),
        CP_API__PORT=str(api_port),
        CP_DEV__TEMPORAL_PORT=str(temporal_port),
        CP_DEV__TEMPORAL_UI_PORT=str(ui_port),
    )
    log = data_dir.parent / f"{data_dir.name}-{phase}.out"
    readyz = f"http://127.0.0.1:{api_port}/readyz"
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "control_plane.cli", "dev"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        with httpx.Client(timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"cpctl dev exited early:\n{log.read_text()[-3000:]}")
                try:
                    if client.get(readyz).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - started > 300:
                    raise RuntimeError("not ready within 300 s")
                time.sleep(0.05)
        ready_seconds = time.perf_counter() - started
        time.sleep(idle_seconds)
        tree = _tree(psutil.Process(process.pid))
        rss, pss = _memory(tree)
        per_child = _per_child(data_dir)
        stopping = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        stop_seconds = time.perf_counter() - stopping
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {
        "phase": phase,
        "ready_seconds": round(ready_seconds, 2),
        "idle_processes": len(tree),
        "idle_rss_mib": round(rss / MIB, 1),
        "idle_pss_mib": round(pss / MIB, 1),
        "pss_mib_by_child": per_child,
        "stop_seconds": round(stop_seconds, 2),
        "exit_code": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    for run in range(1, args.runs + 1):
        root = Path(tempfile.mkdtemp(prefix="cp-bench-dev-"))
        data_dir = root / "data"
        try:
            for phase in ("cold", "warm"):
                result = {"run": run, **measure_start(data_dir, phase, args.idle_seconds)}
                results.append(result)
                print(
                    f"run {run} {phase}: ready in {result['ready_seconds']:.2f} s,"
                    f" idle RSS {result['idle_rss_mib']:.0f} MiB",
                    flush=True,
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def median(phase: str, key: str) -> float:
        return round(statistics.median(float(r[key]) for r in results if r["phase"] == phase), 2)

    summary = {
        phase: {
            key: median(phase, key)
            for key in ("ready_seconds", "idle_rss_mib", "idle_pss_mib", "stop_seconds")
        }
        for phase in ("cold", "warm")
    }
    print()
    header = f"{'run':>3}  {'phase':<5} {'ready s':>8} {'procs':>6} {'RSS MiB':>8}"
    header += f" {'PSS MiB':>8} {'stop s':>7}"
    print(header)
    for r in results:
        print(
            f"{r['run']:>3}  {r['phase']:<5} {r['ready_seconds']:>8.2f} {r['idle_processes']:>6}"
            f" {r['idle_rss_mib']:>8.1f} {r['idle_pss_mib']:>8.1f} {r['stop_seconds']:>7.2f}"
        )
    for phase, values in summary.items():
        print(
            f"median {phase}: ready {values['ready_seconds']:.2f} s,"
            f" RSS {values['idle_rss_mib']:.0f} MiB, PSS {values['idle_pss_mib']:.0f} MiB,"
            f" stop {values['stop_seconds']:.2f} s"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "dev_stack",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        },
        "idle_seconds": args.idle_seconds,
        "runs": results,
        "median": summary,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
