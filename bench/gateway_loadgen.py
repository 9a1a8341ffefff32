"""The load generator of `bench/gateway_overhead.py`, run as its own process so that it
shares no GIL (and no event loop) with what it measures.

Closed loop: `--concurrency` workers, each on its own keep-alive connection, send one
chat completion after another to `--url` for `--warmup` + `--seconds` seconds. Only
requests that finish inside the measured window (after the warm-up) are counted. For a
stream, latency is the time to the last byte and TTFT the time to the first body byte.

At the start and the end of the window it reads the CPU time of each `--watch NAME=PID`
process (with its children) and of itself, so that the caller gets CPU seconds per
request of every process on the path. Prints one JSON object on stdout.

    python bench/gateway_loadgen.py --url http://127.0.0.1:8080/v1/chat/completions \\
        --model sim --concurrency 16 --seconds 5 --stream --watch upstream=1234
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time
from typing import Any

import aiohttp
import psutil


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its living children."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def self_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99, mean and max of seconds, in milliseconds."""

    def ms(value: float | None) -> float | None:
        return round(value * 1000, 3) if value is not None else None

    return {
        "p50_ms": ms(percentile(values, 50)),
        "p90_ms": ms(percentile(values, 90)),
        "p99_ms": ms(percentile(values, 99)),
        "mean_ms": ms(statistics.fmean(values)) if values else None,
        "max_ms": ms(max(values)) if values else None,
    }


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    watch = dict(item.split("=", 1) for item in args.watch)
    pids = {name: int(pid) for name, pid in watch.items()}
    body = json.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": "Say something short about gateways."}],
            "stream": args.stream,
        }
    ).encode()
    headers = {"content-type": "application/json"}
    if args.key:
        headers["authorization"] = f"Bearer {args.key}"

    latencies: list[float] = []
    ttfts: list[float] = []
    overheads: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    cpu: dict[str, dict[str, float]] = {"start": {}, "end": {}}

    started = time.perf_counter()
    window_start = started + args.warmup
    window_end = window_start + args.seconds

    def snapshot(at: str) -> None:
        cpu[at] = {name: tree_cpu(pid) for name, pid in pids.items()}
        cpu[at]["loadgen"] = self_cpu()

    async def snapshots() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        snapshot("start")
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        snapshot("end")

    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
    ) as session:

        async def one() -> None:
            sent = time.perf_counter()
            first: float | None = None
            overhead: str | None = None
            async with session.post(args.url, data=body, headers=headers) as response:
                overhead = response.headers.get("x-cp-overhead-ms")
                if args.stream:
                    tail = b""
                    async for chunk in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                        tail = (tail + chunk)[-64:]
                    ok = response.status == 200 and b"[DONE]" in tail
                else:
                    data = await response.read()
                    ok = response.status == 200 and b'"choices"' in data
            done = time.perf_counter()
            if not ok:
                errors[f"http_{response.status}"] += 1
                return
            if window_start <= done < window_end:
                latencies.append(done - sent)
                if first is not None:
                    ttfts.append(first - sent)
                if overhead is not None:
                    overheads.append(float(overhead) / 1000)

        async def worker() -> None:
            while time.perf_counter() < window_end:
                try:
                    await one()
                except (aiohttp.ClientError, TimeoutError, OSError) as err:
                    errors[type(err).__name__] += 1
                    await asyncio.sleep(0.01)

        watcher = asyncio.create_task(snapshots())
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        await watcher

    completed = len(latencies)
    cpu_seconds = {name: cpu["end"][name] - cpu["start"][name] for name in cpu["end"]}
    result: dict[str, Any] = {
        "concurrency": args.concurrency,
        "stream": args.stream,
        "seconds": args.seconds,
        "requests": completed,
        "errors": dict(errors),
        "rps": round(completed / args.seconds, 1),
        "latency": summary_ms(latencies),
        "cpu_seconds": {name: round(value, 3) for name, value in cpu_seconds.items()},
        "cpu_ms_per_request": {
            name: round(value * 1000 / completed, 4) if completed else None
            for name, value in cpu_seconds.items()
        },
    }
    if args.stream:
        result["ttft"] = summary_ms(ttfts)
    if overheads:
        result["reported_overhead"] = summary_ms(overheads)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", default="")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--watch", action="append", default=[], help="NAME=PID (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(drive(args))
    else:
        result = uvloop.run(drive(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
