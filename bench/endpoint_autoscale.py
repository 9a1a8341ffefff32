"""How fast an endpoint's autoscaler reacts to a load step, on the real stack with the
`local` cluster, against the configured defaults of the Kubernetes HPA and SkyServe.

One endpoint of the simulator (slow tokens, so requests stay in flight) autoscales
between 1 and 3 replicas. Each run applies a load step: a closed loop of `--clients`
concurrent clients, each sending one streaming completion after another to the ready
replicas round-robin (there is no gateway yet: the load re-reads the endpoint's ready
replica URLs from the API every `--poll-s` seconds, as a router would). Measured:

* scale-up: from the load step to the scale-up event, to a new replica being listed
  ready, to the first request sent to it and to its first response byte (a new replica
  is serving), checked afterwards by the new replicas' own `/metrics` request counters;
* scale-down: from the end of the load (the last in-flight request answered) to the
  scale-down event(s) and to the extra replica processes being gone.

The HPA and SkyServe figures are NOT measured runs: they are the earliest those systems
could react with their default configuration (a lower bound from their settings). The
fair comparison is the "overhead" block: our measured time minus our own configured
window, i.e. what our machinery adds on top of whatever window is configured.

Everything is real: embedded PostgreSQL and Redis, a Temporal dev server, the API and
every worker pool in this process, simulator replicas as child processes of the
`local` provider.

    .venv/bin/python bench/endpoint_autoscale.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from endpoint_deploy import delete_all, local_setup, wait_running  # bench/ is on sys.path
from model_onboarding import infrastructure, running_stack
from prometheus_client.parser import text_string_to_metric_families

RESULTS = Path(__file__).resolve().parent / "results" / "endpoint_autoscale.json"
NAME = "autoscale"

# A request takes ttft + (tokens - 1) * itl = 0.49 s. The closed loop keeps `--clients`
# requests in flight whatever that duration; it is short so that a client is free to
# send to a new replica soon after it is listed (with 2 s requests, the first request a
# new replica sees waits for a client to finish its current one: about 2 s of load
# artefact on top of the autoscaler).
ENGINE_ARGS = {"ttft_ms": 200, "itl_ms": 10, "output_tokens": 30, "max_concurrency": 8}
RECONCILE_INTERVAL_S = 1.0
AUTOSCALE = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_concurrency_per_replica": 2,
    "scale_up_window_s": 0,
    "scale_down_stabilization_s": 10,
}

# Configured defaults of other systems (not measured here).
HPA_SYNC_PERIOD_S = 15.0  # kube-controller-manager --horizontal-pod-autoscaler-sync-period
HPA_SCALE_UP_STABILIZATION_S = 0.0  # behavior.scaleUp.stabilizationWindowSeconds
HPA_SCALE_DOWN_STABILIZATION_S = 300.0  # behavior.scaleDown.stabilizationWindowSeconds
SKYSERVE_UPSCALE_DELAY_S = 300.0  # replica_policy.upscale_delay_seconds
SKYSERVE_DOWNSCALE_DELAY_S = 1200.0  # replica_policy.downscale_delay_seconds
SKYSERVE_DECISION_INTERVAL_S = 20.0  # AUTOSCALER_DEFAULT_DECISION_INTERVAL_SECONDS


@dataclass
class Served:
    url: str
    sent: float
    first_byte: float | None
    done: float
    status: int  # 0: no HTTP answer


@dataclass
class Watch:
    """What the poller saw of the endpoint, with wall-clock times (time.time())."""

    ready_urls: list[str] = field(default_factory=list)
    first_ready: dict[str, float] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    # Each reconcile stores what it observed, stamped `observed_at`: their spacing is the
    # real sampling period (the interval plus the reconcile's own work).
    observed: list[float] = field(default_factory=list)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _ready(body: dict[str, Any]) -> list[str]:
    return [r["url"] for r in body["replicas"] if r["state"] == "ready" and r["url"]]


async def watch(api: httpx.AsyncClient, endpoint_id: str, seen: Watch, every: float) -> None:
    """Poll the endpoint: the ready URLs the load routes to, when each URL was first seen
    ready, and every replica's pid."""
    while True:
        response = await api.get(f"/api/v1/endpoints/{endpoint_id}")
        now = time.time()
        if response.status_code == 200:
            body = response.json()
            seen.body = body
            urls = _ready(body)
            for url in urls:
                seen.first_ready.setdefault(url, now)
            for replica in body["replicas"]:
                if replica["url"] and replica["pid"]:
                    seen.pids[replica["url"]] = replica["pid"]
            stamps = [_ts(replica["observed_at"]) for replica in body["replicas"]]
            if stamps and (not seen.observed or max(stamps) > seen.observed[-1]):
                seen.observed.append(max(stamps))
            seen.ready_urls = urls
        await asyncio.sleep(every)


async def client_loop(
    http: httpx.AsyncClient,
    seen: Watch,
    turn: itertools.count[int],
    stop: asyncio.Event,
    served: list[Served],
) -> None:
    """One closed-loop client: a new request as soon as the last one is answered."""
    payload = {"model": NAME, "prompt": "measure the autoscaler", "stream": True}
    while not stop.is_set():
        urls = seen.ready_urls
        if not urls:
            await asyncio.sleep(0.05)
            continue
        url = urls[next(turn) % len(urls)]
        sent = time.time()
        first: float | None = None
        status = 0
        try:
            async with http.stream("POST", f"{url}/v1/completions", json=payload) as response:
                status = response.status_code
                async for _ in response.aiter_bytes():
                    if first is None:
                        first = time.time()
        except httpx.HTTPError:
            status = 0
        served.append(Served(url, sent, first, time.time(), status))
        if status != 200:
            await asyncio.sleep(0.05)


async def request_counts(http: httpx.AsyncClient, urls: list[str]) -> dict[str, float]:
    """Finished requests per replica, from its own `/metrics`."""
    counts: dict[str, float] = {}
    for url in urls:
        text = (await http.get(f"{url}/metrics")).text
        counts[url] = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "vllm:request_success"
            for sample in family.samples
            if sample.name.endswith("_total")
        )
    return counts


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_for(seen: Watch, check: Any, within: float, what: str, every: float = 0.05) -> float:
    deadline = time.time() + within
    while time.time() < deadline:
        if seen.body and check(seen.body):
            return time.time()
        await asyncio.sleep(every)
    raise TimeoutError(f"{what}: not within {within} s; last seen {seen.body}")


def _steady_at_min(body: dict[str, Any]) -> bool:
    return (
        body["replicas_desired"] == AUTOSCALE["min_replicas"]
        and len(body["replicas"]) == AUTOSCALE["min_replicas"]
        and len(_ready(body)) == AUTOSCALE["min_replicas"]
    )


async def one_run(
    api: httpx.AsyncClient,
    http: httpx.AsyncClient,
    endpoint_id: str,
    args: argparse.Namespace,
    rng: random.Random,
) -> dict[str, Any]:
    seen = Watch()
    poller = asyncio.create_task(watch(api, endpoint_id, seen, args.poll_s))
    try:
        await wait_for(seen, _steady_at_min, 120, "steady at the minimum before the step")
        # Steadiness is seen just after a reconcile wrote it: without a random pause the
        # step would always land at the same point of the reconcile cycle.
        phase = rng.uniform(0, RECONCILE_INTERVAL_S)
        await asyncio.sleep(phase)
        before = set(seen.ready_urls)
        served: list[Served] = []
        stop = asyncio.Event()
        turn = itertools.count()

        # --- the load step --------------------------------------------------------
        step = time.time()
        clients = [
            asyncio.create_task(client_loop(http, seen, turn, stop, served))
            for _ in range(args.clients)
        ]
        max_replicas = AUTOSCALE["max_replicas"]

        def new_serving() -> dict[str, float]:
            firsts: dict[str, float] = {}
            for s in served:
                if s.url not in before and s.status == 200 and s.first_byte is not None:
                    firsts[s.url] = min(firsts.get(s.url, s.first_byte), s.first_byte)
            return firsts

        deadline = step + args.max_hold_s
        while time.time() < deadline:
            if len(new_serving()) >= max_replicas - len(before):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.hold_s)
        ready_at_end = list(seen.ready_urls)
        counts = await request_counts(http, ready_at_end)

        # --- the load ends ----------------------------------------------------------
        stopped = time.time()
        stop.set()
        await asyncio.gather(*clients)
        drained = max(s.done for s in served)
        # Every replica that appeared during the run, served or not.
        new_urls = sorted(set(seen.pids) - before)
        new_pids = {url: seen.pids[url] for url in new_urls}

        # Extra replica processes gone, and the API back at the minimum.
        gone_at: dict[int, float] = {}
        api_min_at: float | None = None
        limit = time.time() + args.max_down_s
        while time.time() < limit:
            now = time.time()
            for pid in new_pids.values():
                if pid not in gone_at and _gone(pid):
                    gone_at[pid] = now
            if api_min_at is None and seen.body and _steady_at_min(seen.body):
                api_min_at = now
            if api_min_at is not None and len(gone_at) == len(new_pids):
                break
            await asyncio.sleep(0.05)
        final = (await api.get(f"/api/v1/endpoints/{endpoint_id}")).json()
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller

    events = sorted(
        (e for e in final["scaling_events"] if _ts(e["time"]) >= step - 0.5),
        key=lambda e: _ts(e["time"]),
    )
    ups = [e for e in events if e["to_replicas"] > e["from_replicas"]]
    downs = [e for e in events if e["to_replicas"] < e["from_replicas"]]
    to_min = [e for e in downs if e["to_replicas"] == AUTOSCALE["min_replicas"]]
    firsts = new_serving()

    def new_first(attribute: str) -> float | None:
        values = [
            getattr(s, attribute)
            for s in served
            if s.url in new_urls and s.status == 200 and getattr(s, attribute) is not None
        ]
        return min(values) - step if values else None

    def rel(moment: float | None, origin: float) -> float | None:
        return None if moment is None else round(moment - origin, 3)

    per_url: dict[str, int] = {}
    for s in served:
        if s.status == 200:
            per_url[s.url] = per_url.get(s.url, 0) + 1
    listed = rel(
        min((seen.first_ready[u] for u in new_urls if u in seen.first_ready), default=None), step
    )
    sent = rel(new_first("sent"), 0)
    periods = [b - a for a, b in itertools.pairwise(seen.observed)]
    return {
        "pause_before_step_s": round(phase, 3),
        # Gaps between consecutive observations the poller saw (it may miss one if two
        # land within one poll, which would show as a doubled gap).
        "reconcile_period_s": {
            "median": round(statistics.median(periods), 3) if periods else None,
            "max": round(max(periods), 3) if periods else None,
            "observations": len(seen.observed),
        },
        "replicas_before": len(before),
        "new_replicas": len(new_urls),
        "scale_up": {
            "event_s": rel(_ts(ups[0]["time"]), step) if ups else None,
            "new_replica_listed_ready_s": listed,
            "first_request_sent_to_new_replica_s": sent,
            # Routing lag plus the wait for a client of the closed loop to be free.
            "listed_ready_to_first_request_sent_s": (
                None if listed is None or sent is None else round(sent - listed, 3)
            ),
            "first_byte_from_new_replica_s": rel(new_first("first_byte"), 0),
            "first_response_done_by_new_replica_s": rel(new_first("done"), 0),
            "all_new_replicas_serving_s": rel(max(firsts.values()), step) if firsts else None,
        },
        "scale_down": {
            "load_stopped_to_drained_s": round(drained - stopped, 3),
            "first_event_s": rel(_ts(downs[0]["time"]), drained) if downs else None,
            "event_to_min_s": rel(_ts(to_min[0]["time"]), drained) if to_min else None,
            "extra_replicas_gone_s": (
                rel(max(gone_at.values()), drained)
                if new_pids and len(gone_at) == len(new_pids)
                else None
            ),
            "api_back_at_min_s": rel(api_min_at, drained),
        },
        "requests": {
            "answered_200": sum(per_url.values()),
            "failed": sum(1 for s in served if s.status != 200),
            "per_replica": {url: per_url.get(url, 0) for url in sorted(per_url)},
            # The replicas' own counters (vllm:request_success_total) at the end of the
            # hold: a new replica counting requests has served them.
            "replica_metrics_request_success": counts,
            "new_replicas_counted_requests": all(counts.get(u, 0) > 0 for u in new_urls)
            and bool(new_urls),
        },
        "events": [
            {
                "t_from_step_s": round(_ts(e["time"]) - step, 3),
                "from": e["from_replicas"],
                "to": e["to_replicas"],
                "trigger": e["trigger"],
                "metric": e["metric"],
                "reason": e["reason"],
            }
            for e in events
        ],
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _ratio(ours: float | None, theirs: float) -> float | None:
    return None if ours is None else round(ours / theirs, 4)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(phase: str, key: str) -> float | None:
        return _median([run[phase][key] for run in runs])

    up = {key: med("scale_up", key) for key in runs[0]["scale_up"]}
    down = {key: med("scale_down", key) for key in runs[0]["scale_down"]}
    return {
        "scale_up_s": up,
        "scale_down_s": down,
        "reconcile_period_s": med("reconcile_period_s", "median"),
    }


def compare(summary: dict[str, Any]) -> dict[str, Any]:
    up = summary["scale_up_s"]
    down = summary["scale_down_s"]
    up_window = float(AUTOSCALE["scale_up_window_s"])
    down_window = float(AUTOSCALE["scale_down_stabilization_s"])
    hpa_up = HPA_SCALE_UP_STABILIZATION_S + HPA_SYNC_PERIOD_S
    hpa_down = HPA_SCALE_DOWN_STABILIZATION_S + HPA_SYNC_PERIOD_S
    serving = up["first_byte_from_new_replica_s"]
    decided = up["event_s"]
    down_event = down["event_to_min_s"]
    gone = down["extra_replicas_gone_s"]

    def minus(value: float | None, window: float) -> float | None:
        return None if value is None else round(value - window, 3)

    return {
        "reference_defaults": {
            "what": (
                "Configured DEFAULTS of those systems, not measured runs: the earliest they "
                "could react given their configuration alone (a lower bound; their metrics "
                "pipeline, decision and pod/VM start come on top)."
            ),
            "kubernetes_hpa": {
                "sync_period_s": HPA_SYNC_PERIOD_S,
                "scale_up_stabilization_s": HPA_SCALE_UP_STABILIZATION_S,
                "scale_down_stabilization_s": HPA_SCALE_DOWN_STABILIZATION_S,
                "earliest_scale_up_s": hpa_up,
                "earliest_scale_up_note": "up to one 15 s sync period (7.5 s on average)",
                "earliest_scale_down_s": hpa_down,
                "earliest_scale_down_note": "300 s stabilization + one 15 s sync period",
            },
            "skyserve": {
                "upscale_delay_s": SKYSERVE_UPSCALE_DELAY_S,
                "downscale_delay_s": SKYSERVE_DOWNSCALE_DELAY_S,
                "decision_interval_s": SKYSERVE_DECISION_INTERVAL_S,
                "earliest_scale_up_s": SKYSERVE_UPSCALE_DELAY_S,
                "earliest_scale_down_s": SKYSERVE_DOWNSCALE_DELAY_S,
                "note": "the delays alone; the 20 s decision interval is not added",
            },
        },
        "ratio_ours_to_their_defaults": {
            "what": (
                "our measured median / their configured lower bound; differs mostly because "
                "our windows are configured shorter, see overhead_beyond_configured_window"
            ),
            "hpa_scale_up_decision": _ratio(decided, hpa_up),
            "hpa_scale_up_new_replica_serving": _ratio(serving, hpa_up),
            "hpa_scale_down_event": _ratio(down_event, hpa_down),
            "hpa_scale_down_replicas_gone": _ratio(gone, hpa_down),
            "skyserve_scale_up_decision": _ratio(decided, SKYSERVE_UPSCALE_DELAY_S),
            "skyserve_scale_up_new_replica_serving": _ratio(serving, SKYSERVE_UPSCALE_DELAY_S),
            "skyserve_scale_down_event": _ratio(down_event, SKYSERVE_DOWNSCALE_DELAY_S),
            "skyserve_scale_down_replicas_gone": _ratio(gone, SKYSERVE_DOWNSCALE_DELAY_S),
        },
        "overhead_beyond_configured_window_s": {
            "what": (
                "The like-for-like figure: measured median minus OUR configured window "
                f"(scale_up_window_s={up_window:g}, scale_down_stabilization_s="
                f"{down_window:g}). It is what our machinery adds (sampling every "
                f"reconcile_interval_s={RECONCILE_INTERVAL_S:g}, observing, deciding, "
                "starting or stopping processes, recording); with the HPA's or SkyServe's "
                "windows configured, expect their window plus this. The loop samples "
                "every reconcile_interval_s plus its own work (reconcile_period_s below), "
                "and the scale-down waits for two samples: the first one to see the load "
                "gone starts the window, the first one after the window ends acts; so up "
                "to about two periods of it are sampling, not work."
            ),
            "reconcile_period_s": summary["reconcile_period_s"],
            "scale_up_decision": minus(decided, up_window),
            "scale_up_new_replica_serving": minus(serving, up_window),
            "scale_up_all_new_replicas_serving": minus(up["all_new_replicas_serving_s"], up_window),
            "scale_down_first_event": minus(down["first_event_s"], down_window),
            "scale_down_event_to_min": minus(down_event, down_window),
            "scale_down_extra_replicas_gone": minus(gone, down_window),
        },
    }


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    async with infrastructure(root) as settings, running_stack(settings) as api:
        project_id, cluster_id = await local_setup(api)
        response = await api.post(
            "/api/v1/endpoints",
            json={
                "project_id": project_id,
                "cluster_id": cluster_id,
                "name": NAME,
                "engine": "simulator",
                "engine_args": ENGINE_ARGS,
                "replicas": 1,
                "reconcile_interval_s": RECONCILE_INTERVAL_S,
                "autoscale": AUTOSCALE,
            },
        )
        response.raise_for_status()
        endpoint_id = str(response.json()["id"])
        runs: list[dict[str, Any]] = []
        try:
            await wait_running(api, endpoint_id, 120)
            limits = httpx.Limits(max_connections=args.clients * 4)
            async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as http:
                rng = random.Random(args.seed)
                for index in range(args.runs):
                    run = await one_run(api, http, endpoint_id, args, rng)
                    runs.append(run)
                    print(f"run {index + 1}/{args.runs}: {json.dumps(run)}", flush=True)
        finally:
            await delete_all(api, [endpoint_id])
    load_after = os.getloadavg()

    summary = summarise(runs)
    return {
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15_before": [round(v, 2) for v in load_before],
            "load_average_1_5_15_after": [round(v, 2) for v in load_after],
        },
        "setup": {
            "cluster": "local",
            "engine": "simulator",
            "engine_args": ENGINE_ARGS,
            "request_s_nominal": (
                ENGINE_ARGS["ttft_ms"] + (ENGINE_ARGS["output_tokens"] - 1) * ENGINE_ARGS["itl_ms"]
            )
            / 1000,
            "reconcile_interval_s": RECONCILE_INTERVAL_S,
            "pause_before_each_step": (
                f"uniform random in [0, {RECONCILE_INTERVAL_S:g}] s after steady at the "
                f"minimum (seed {args.seed}), so steps land at random points of the "
                "reconcile cycle"
            ),
            "autoscale": AUTOSCALE,
            "clients": args.clients,
            "load": (
                "closed loop of streaming /v1/completions, round-robin over the ready "
                f"replica URLs re-read from the API every {args.poll_s:g} s"
            ),
            "hold_after_all_new_serving_s": args.hold_s,
            "clock": (
                "scale-up times from the load step; scale-down times from the end of "
                "the load (last in-flight request answered)"
            ),
        },
        "runs": len(runs),
        "median": summary,
        "comparison": compare(summary),
        "all": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="of the pauses before the steps")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--poll-s", type=float, default=0.2)
    parser.add_argument("--hold-s", type=float, default=2.0)
    parser.add_argument("--max-hold-s", type=float, default=60.0)
    parser.add_argument("--max-down-s", type=float, default=90.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cp-bench-autoscale-") as root:
        report = asyncio.run(measure(args, Path(root)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
