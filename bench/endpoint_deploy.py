"""How long an endpoint takes from `POST /api/v1/endpoints` to `running`, against the
baseline of starting the same simulator process by hand and polling its `/health`
(what no control plane can beat), plus many endpoints deployed at once.

Everything is real: embedded PostgreSQL and Redis, a Temporal dev server, the API and
every worker pool in this process, simulator replicas as child processes of the
`local` provider.

    .venv/bin/python bench/endpoint_deploy.py --runs 10 --concurrent 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from model_onboarding import infrastructure, running_stack  # bench/ is on sys.path

from control_plane.devstack.services import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "endpoint_deploy.json"
MIB = 1024 * 1024


def bare_start() -> float:
    """Seconds from launching a simulator by hand to its first healthy answer."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "control_plane.endpoints.engines.simulator", "--port", str(port)]
        + ["--model", "bare"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.01)
    finally:
        process.terminate()
        process.wait(10)


def tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


async def wait_running(api: httpx.AsyncClient, endpoint_id: str, within: float) -> None:
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        body = (await api.get(f"/api/v1/endpoints/{endpoint_id}")).json()
        if body["status"] == "running":
            return
        if body["status"] == "failed":
            raise RuntimeError(body["status_reason"])
        await asyncio.sleep(0.05)
    raise TimeoutError(f"endpoint {endpoint_id} not running after {within} s")


async def deploy(
    api: httpx.AsyncClient, project_id: str, cluster_id: str, name: str
) -> tuple[str, float]:
    started = time.perf_counter()
    response = await api.post(
        "/api/v1/endpoints",
        json={
            "project_id": project_id,
            "cluster_id": cluster_id,
            "name": name,
            "engine": "simulator",
            "engine_args": {"ttft_ms": 0, "itl_ms": 0},
        },
    )
    response.raise_for_status()
    endpoint_id = str(response.json()["id"])
    await wait_running(api, endpoint_id, 300)
    return endpoint_id, time.perf_counter() - started


async def delete_all(api: httpx.AsyncClient, ids: list[str]) -> None:
    for endpoint_id in ids:
        await api.delete(f"/api/v1/endpoints/{endpoint_id}", params={"grace_s": 0})
    for endpoint_id in ids:
        while True:
            if (await api.get(f"/api/v1/endpoints/{endpoint_id}")).status_code == 404:
                break
            await asyncio.sleep(0.1)


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    baseline = [await asyncio.to_thread(bare_start) for _ in range(args.runs)]
    async with infrastructure(root) as settings, running_stack(settings) as api:
        cluster = (
            await api.post("/api/v1/clusters", json={"name": "local", "kind": "local"})
        ).json()
        while True:
            status = (await api.get(f"/api/v1/clusters/{cluster['id']}")).json()["status"]
            if status == "available":
                break
            await asyncio.sleep(0.1)
        project = (await api.post("/api/v1/projects", json={"name": "bench"})).json()

        sequential: list[float] = []
        for index in range(args.runs):
            endpoint_id, seconds = await deploy(api, project["id"], cluster["id"], f"seq-{index}")
            sequential.append(seconds)
            await delete_all(api, [endpoint_id])

        rss_before = tree_rss()
        peak = rss_before
        started = time.perf_counter()
        task = asyncio.gather(
            *(
                deploy(api, project["id"], cluster["id"], f"many-{index}")
                for index in range(args.concurrent)
            )
        )
        while not task.done():
            peak = max(peak, tree_rss())
            await asyncio.sleep(0.2)
        deployed = await task
        wall = time.perf_counter() - started
        await delete_all(api, [endpoint_id for endpoint_id, _ in deployed])

    bare = statistics.median(baseline)
    deploy_median = statistics.median(sequential)
    return {
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "runs": args.runs,
        "baseline_bare_process_start_s": {"median": bare, "all": baseline},
        "post_to_running_s": {
            "median": deploy_median,
            "min": min(sequential),
            "max": max(sequential),
            "all": sequential,
        },
        "ratio_to_bare_start": deploy_median / bare,
        "concurrent": {
            "endpoints": args.concurrent,
            "all_running": len(deployed) == args.concurrent,
            "wall_s": wall,
            "median_each_s": statistics.median(seconds for _, seconds in deployed),
            "rss_before_mib": rss_before / MIB,
            "peak_rss_mib_process_tree": peak / MIB,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cp-bench-deploy-") as root:
        report = asyncio.run(measure(args, Path(root)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
