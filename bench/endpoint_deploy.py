"""How long an endpoint takes from `POST /api/v1/endpoints` to `running`, against the
baseline of starting the same simulator process by hand and polling its `/health`
(what no control plane can beat), plus many endpoints deployed at once, against the
baseline of starting as many simulators by hand at once and waiting for all of them.

The concurrent deploys are watched by one poller listing the project's endpoints (not
one poller per endpoint, which at 50 endpoints would load the API, and through the GIL
the workers sharing its process, more than the deploys do). Memory is sampled every
`--sample-s` seconds and split into this process (the API and every worker pool), the
replicas (simulator processes) and the infrastructure (PostgreSQL, Redis, Temporal);
this process's exact peak is also read from the kernel (`ru_maxrss`).

Everything is real: embedded PostgreSQL and Redis, a Temporal dev server, the API and
every worker pool in this process, simulator replicas as child processes of the
`local` provider.

    .venv/bin/python bench/endpoint_deploy.py --runs 10 --concurrent 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
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


def bare_start_many(count: int) -> float:
    """Seconds from launching `count` simulators by hand at once to all of them healthy:
    the floor for deploying as many endpoints at once on this machine."""
    ports = [free_port() for _ in range(count)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", REPLICA_MODULE, "--port", str(port), "--model", "bare"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        waiting = set(ports)
        with httpx.Client(timeout=1, trust_env=False) as client:
            while waiting:
                for port in list(waiting):
                    try:
                        if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                            waiting.discard(port)
                    except httpx.HTTPError:
                        pass
                time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


REPLICA_MODULE = "control_plane.endpoints.engines.simulator"
# Small requests for the concurrent deploys, so that the local cluster's capacity can
# never refuse them. Today they change nothing: with a named cluster placement does not
# check the fit (activities/endpoints.py `_place`), and the local provider neither
# reserves nor limits a replica's cpu or memory.
CONCURRENT_ENGINE_ARGS = {"ttft_ms": 0, "itl_ms": 0, "cpu": 0.01, "memory_mb": 16}
SEQUENTIAL_ENGINE_ARGS = {"ttft_ms": 0, "itl_ms": 0}


def rss_split() -> dict[str, int]:
    """Resident memory of this process, of its replica children and of the rest of its
    children (the embedded services), in bytes."""
    me = psutil.Process()
    split = {"bench_process": me.memory_info().rss, "replicas": 0, "infrastructure": 0}
    for process in me.children(recursive=True):
        try:
            rss = process.memory_info().rss
            replica = REPLICA_MODULE in process.cmdline()
        except psutil.Error:
            continue
        split["replicas" if replica else "infrastructure"] += rss
    split["total"] = sum(split.values())
    return split


def pss_split() -> dict[str, int]:
    """Proportional set size (shared pages divided among their sharers) of the same
    three parts: summed RSS counts each shared library or shared buffer once per process
    mapping it. Slower to read than RSS, so taken once, with everything running."""
    me = psutil.Process()
    split = {"bench_process": me.memory_full_info().pss, "replicas": 0, "infrastructure": 0}
    for process in me.children(recursive=True):
        try:
            pss = process.memory_full_info().pss
            replica = REPLICA_MODULE in process.cmdline()
        except psutil.Error:
            continue
        split["replicas" if replica else "infrastructure"] += pss
    split["total"] = sum(split.values())
    return split


def peak_rss_self() -> int:
    """This process's peak resident memory since it started (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def local_setup(api: httpx.AsyncClient) -> tuple[str, str]:
    """Onboard the local cluster (wait until available) and create a project."""
    cluster = (await api.post("/api/v1/clusters", json={"name": "local", "kind": "local"})).json()
    while True:
        status = (await api.get(f"/api/v1/clusters/{cluster['id']}")).json()["status"]
        if status == "available":
            break
        await asyncio.sleep(0.1)
    project = (await api.post("/api/v1/projects", json={"name": "bench"})).json()
    return str(project["id"]), str(cluster["id"])


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


async def create(
    api: httpx.AsyncClient,
    project_id: str,
    cluster_id: str,
    name: str,
    engine_args: dict[str, Any],
) -> str:
    response = await api.post(
        "/api/v1/endpoints",
        json={
            "project_id": project_id,
            "cluster_id": cluster_id,
            "name": name,
            "engine": "simulator",
            "engine_args": engine_args,
        },
    )
    response.raise_for_status()
    return str(response.json()["id"])


async def deploy(
    api: httpx.AsyncClient, project_id: str, cluster_id: str, name: str
) -> tuple[str, float]:
    started = time.perf_counter()
    endpoint_id = await create(api, project_id, cluster_id, name, SEQUENTIAL_ENGINE_ARGS)
    await wait_running(api, endpoint_id, 300)
    return endpoint_id, time.perf_counter() - started


async def deploy_many(
    api: httpx.AsyncClient, project_id: str, count: int, cluster_id: str, within: float
) -> tuple[dict[str, float], dict[str, str]]:
    """POST `count` endpoints at once; seconds from each one's POST to it being seen
    running (by one poller listing the project's endpoints), and the failed ones."""
    started: dict[str, float] = {}

    async def one(index: int) -> None:
        began = time.perf_counter()
        endpoint_id = await create(
            api, project_id, cluster_id, f"many-{index}", CONCURRENT_ENGINE_ARGS
        )
        started[endpoint_id] = began

    posting = asyncio.gather(*(one(index) for index in range(count)))
    running: dict[str, float] = {}
    failed: dict[str, str] = {}
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        response = await api.get(
            "/api/v1/endpoints", params={"project_id": project_id, "limit": 200}
        )
        now = time.perf_counter()
        response.raise_for_status()
        for item in response.json()["items"]:
            endpoint_id = str(item["id"])
            if endpoint_id not in started or endpoint_id in running or endpoint_id in failed:
                continue
            if item["status"] == "running":
                running[endpoint_id] = now - started[endpoint_id]
            elif item["status"] == "failed":
                failed[endpoint_id] = item["status_reason"]
        if posting.done() and len(running) + len(failed) == count:
            break
        await asyncio.sleep(0.1)
    await posting
    return running, failed


async def delete_all(api: httpx.AsyncClient, ids: list[str]) -> None:
    for endpoint_id in ids:
        await api.delete(f"/api/v1/endpoints/{endpoint_id}", params={"grace_s": 0})
    for endpoint_id in ids:
        while True:
            if (await api.get(f"/api/v1/endpoints/{endpoint_id}")).status_code == 404:
                break
            await asyncio.sleep(0.1)


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    baseline = [await asyncio.to_thread(bare_start) for _ in range(args.runs)]
    baseline_many = await asyncio.to_thread(bare_start_many, args.concurrent)
    async with infrastructure(root) as settings, running_stack(settings) as api:
        project_id, cluster_id = await local_setup(api)

        sequential: list[float] = []
        for index in range(args.runs):
            endpoint_id, seconds = await deploy(api, project_id, cluster_id, f"seq-{index}")
            sequential.append(seconds)
            await delete_all(api, [endpoint_id])

        before = await asyncio.to_thread(rss_split)
        peak = dict(before)
        started = time.perf_counter()
        task = asyncio.create_task(
            deploy_many(api, project_id, args.concurrent, cluster_id, within=600)
        )
        while not task.done():
            sample = await asyncio.to_thread(rss_split)
            peak = {key: max(peak[key], value) for key, value in sample.items()}
            await asyncio.sleep(args.sample_s)
        running, failed = await task
        wall = time.perf_counter() - started
        # Everything running: one more look, when all replicas exist.
        sample = await asyncio.to_thread(rss_split)
        peak = {key: max(peak[key], value) for key, value in sample.items()}
        pss = await asyncio.to_thread(pss_split)
        listed = (
            await api.get("/api/v1/endpoints", params={"project_id": project_id, "limit": 200})
        ).json()["items"]
        await delete_all(api, [str(item["id"]) for item in listed])
        peak_self = peak_rss_self()

    bare = statistics.median(baseline)
    deploy_median = statistics.median(sequential)
    each = sorted(running.values())
    return {
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "memory_total_mib": psutil.virtual_memory().total / MIB,
            # Others share this machine: the load it carried around the run.
            "load_average_1_5_15_before": [round(v, 2) for v in load_before],
            "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        },
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
            "engine_args": CONCURRENT_ENGINE_ARGS,
            "engine_args_note": (
                "cpu and memory_mb set small so capacity cannot refuse 50 replicas; not "
                "needed today (a named cluster skips the fit check, the local provider "
                "neither reserves nor limits them)"
            ),
            "all_running": len(running) == args.concurrent,
            "running": len(running),
            "failed": failed,
            "wall_s": wall,
            "baseline_bare_processes_started_at_once_s": baseline_many,
            "ratio_wall_to_bare_at_once": wall / baseline_many,
            "median_each_s": statistics.median(each) if each else None,
            "max_each_s": max(each) if each else None,
            "watched_by": "one list request per 0.1 s",
            "memory_sampled_every_s": args.sample_s,
            "rss_before_mib": {key: value / MIB for key, value in before.items()},
            "peak_rss_mib": {
                "bench_process_api_and_workers": peak["bench_process"] / MIB,
                "bench_process_kernel_peak": peak_self / MIB,
                "replicas_total": peak["replicas"] / MIB,
                "replicas_per_endpoint": peak["replicas"] / MIB / max(len(running), 1),
                "infrastructure_postgres_redis_temporal": peak["infrastructure"] / MIB,
                "process_tree_total": peak["total"] / MIB,
            },
            "pss_mib_all_running": {key: value / MIB for key, value in pss.items()},
            "peak_note": (
                "each part's peak is its own maximum over the samples; the total is the "
                "maximum of the sampled sums, so the parts need not add up to it. The "
                "kernel peak of the bench process covers its whole life (it includes the "
                "sequential phase)."
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--sample-s", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cp-bench-deploy-") as root:
        report = asyncio.run(measure(args, Path(root)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
