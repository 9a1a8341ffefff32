"""How fast our model scanner (`cp-scan`) is next to modelscan and picklescan, and which
malicious samples each of them catches.

Throughput: `--size-mb` of safetensors shards and as much of torch.save-style zips
(`pytorch_model-0000N-of-0000M.bin`, what Hugging Face repositories ship), generated
into a temporary directory; each tool scans the same directory in the same run (best of
`--repeat`), through its Python API. The files were just written, so all tools read
them from the page cache: the figures compare parsing work, not disks. Neither
competitor analyses safetensors (they skip the files), so the safetensors ratios say
what validating headers costs us next to not looking.

Detection: every sample of `tests/fixtures/model_files.py` (malicious pickles, tampered
safetensors, and the benign corpus for false positives), one tool call per file.

    .venv/bin/python bench/scanner.py --size-mb 200
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from control_plane.models.scanner import SCANNER_NAME, SCANNER_VERSION, scan_path  # noqa: E402
from tests.fixtures.model_files import (  # noqa: E402
    BENIGN_SAMPLES,
    MALICIOUS_SAMPLES,
    write_benign_corpus,
    write_malicious_corpus,
    write_safetensors,
    write_tampered_safetensors,
    write_torch_zip,
)
from workflows.contracts.models import Verdict  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scanner.json"
MB = 1_000_000
# Real checkpoints ship 2-10 GB shards of a few hundred tensors; smaller shards keep the
# per-file costs (open, zip directory, pickle) visible at benchmark sizes.
SHARD_MB = 64
TENSORS_PER_SHARD = 128
TOOLS = ("cp-scan", "modelscan", "picklescan")


def _tensors(rng: np.random.Generator, shard_bytes: int) -> dict[str, np.ndarray]:
    per_tensor = max(shard_bytes // TENSORS_PER_SHARD // 4, 1)
    return {
        f"model.layers.{i}.weight": rng.random(per_tensor, dtype=np.float32)
        for i in range(TENSORS_PER_SHARD)
    }


def generate(root: Path, size_mb: int) -> dict[str, Path]:
    """`size_mb` of safetensors shards and as much of torch zips, in `root`."""
    rng = np.random.default_rng(0)
    shards = max(1, math.ceil(size_mb / SHARD_MB))
    shard_bytes = size_mb * MB // shards
    datasets = {"safetensors": root / "safetensors", "pytorch_zip": root / "pytorch_zip"}
    for directory in datasets.values():
        directory.mkdir(parents=True)
    for index in range(1, shards + 1):
        tensors = _tensors(rng, shard_bytes)
        stem = f"{index:05d}-of-{shards:05d}"
        write_safetensors(datasets["safetensors"] / f"model-{stem}.safetensors", tensors)
        write_torch_zip(datasets["pytorch_zip"] / f"pytorch_model-{stem}.bin", tensors)
    return datasets


# ------------------------------------------------------------------------ the tools


def run_ours(path: Path) -> dict[str, Any]:
    report = scan_path(path)
    return {
        "flagged": report.verdict is not Verdict.CLEAN,
        "findings": len(report.findings),
        "files_analysed": report.files_scanned,
        "error": None,
    }


def run_modelscan(path: Path) -> dict[str, Any]:
    from modelscan.modelscan import ModelScan

    report = ModelScan().scan(path)
    summary = report.get("summary", {})
    issues = report.get("issues") or []
    errors = report.get("errors") or []
    return {
        "flagged": bool(issues),
        "findings": len(issues),
        "files_analysed": summary.get("scanned", {}).get("total_scanned", 0),
        "error": "; ".join(str(e.get("description")) for e in errors) or None,
    }


def run_picklescan(path: Path) -> dict[str, Any]:
    from picklescan import scanner

    if path.is_dir():
        result = scanner.scan_directory_path(str(path))
    else:
        try:
            result = scanner.scan_file_path(str(path))
        except Exception as err:  # a crash on one file counts as an error, not a catch
            return {"flagged": False, "findings": 0, "files_analysed": 0, "error": repr(err)}
    return {
        "flagged": result.issues_count > 0,
        "findings": result.issues_count,
        "files_analysed": result.scanned_files,
        "error": "scan error" if result.scan_err else None,
    }


RUNNERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "cp-scan": run_ours,
    "modelscan": run_modelscan,
    "picklescan": run_picklescan,
}


@contextlib.contextmanager
def quiet() -> Any:
    """The competitors log and print per file; keep the benchmark's output readable."""
    logging.disable(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


# ------------------------------------------------------------------------ measures


def throughput(directory: Path, repeat: int) -> dict[str, Any]:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    tools: dict[str, Any] = {}
    for tool, runner in RUNNERS.items():
        times = []
        result: dict[str, Any] = {}
        for _ in range(repeat):
            started = time.perf_counter()
            with quiet():
                result = runner(directory)
            times.append(time.perf_counter() - started)
        best = min(times)
        tools[tool] = {
            "seconds": round(best, 6),
            "mb_per_s": round(size / MB / best, 1) if best > 0 else None,
            "findings": result["findings"],
            "files_analysed": result["files_analysed"],
        }
    ours = tools["cp-scan"]["seconds"]
    return {
        "files": len(files),
        "bytes": size,
        "tools": tools,
        # How many times faster than the other tool (its seconds / ours).
        "speedup": {
            tool: round(tools[tool]["seconds"] / ours, 2) if ours > 0 else None
            for tool in TOOLS[1:]
        },
    }


def detection(paths: dict[str, Path], expect_flag: bool) -> dict[str, Any]:
    per_sample: dict[str, dict[str, str]] = {}
    for name, path in paths.items():
        per_sample[name] = {}
        for tool, runner in RUNNERS.items():
            try:
                with quiet():
                    result = runner(path)
            except Exception as err:  # a crash on a sample counts as an error, not a catch
                result = {"flagged": False, "error": repr(err)}
            if result["flagged"]:
                outcome = "flagged"
            elif result["error"]:
                outcome = "error"
            else:
                outcome = "clean"
            per_sample[name][tool] = outcome
    totals = {}
    for tool in TOOLS:
        outcomes = [per_sample[name][tool] for name in per_sample]
        good = "flagged" if expect_flag else "clean"
        totals[tool] = {
            "correct": outcomes.count(good),
            "errors": outcomes.count("error"),
            "wrong": sorted(n for n in per_sample if per_sample[n][tool] not in (good, "error")),
        }
    return {"samples": len(paths), "totals": totals, "per_sample": per_sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="Per format.")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cp-bench-scanner-"))
    try:
        started = time.perf_counter()
        datasets = generate(root / "data", args.size_mb)
        print(f"generated {2 * args.size_mb} MB in {time.perf_counter() - started:.1f} s")
        speed = {}
        for kind, directory in datasets.items():
            speed[kind] = throughput(directory, args.repeat)
            line = ", ".join(
                f"{tool} {values['mb_per_s']} MB/s ({values['seconds']} s)"
                for tool, values in speed[kind]["tools"].items()
            )
            print(f"{kind}: {line}; speedup {speed[kind]['speedup']}", flush=True)

        corpus = root / "corpus"
        malicious = {p.name: p for p in write_malicious_corpus(corpus / "malicious")}
        benign = {p.name: p for p in write_benign_corpus(corpus / "benign")}
        tampered = {p.name: p for p in write_tampered_safetensors(corpus / "tampered")}
        found = {
            "malicious": detection(malicious, expect_flag=True),
            "tampered_safetensors": detection(tampered, expect_flag=True),
            "benign": detection(benign, expect_flag=False),
        }
        for group, values in found.items():
            verb = "flagged" if group != "benign" else "left clean"
            line = ", ".join(
                f"{tool} {t['correct']}/{values['samples']}"
                + (f" ({t['errors']} errors)" if t["errors"] else "")
                for tool, t in values["totals"].items()
            )
            print(f"{group}: {verb}: {line}")
        for group in ("malicious", "tampered_safetensors", "benign"):
            for tool in TOOLS[1:]:
                wrong = found[group]["totals"][tool]["wrong"]
                if wrong:
                    print(f"  {group} {tool} wrong on: {', '.join(wrong)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def version(package: str) -> str | None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            return package_version(package)
        except PackageNotFoundError:
            return None

    report = {
        "benchmark": "scanner",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        },
        "tools": {
            "cp-scan": f"{SCANNER_NAME} {SCANNER_VERSION}",
            "modelscan": version("modelscan"),
            "picklescan": version("picklescan"),
        },
        "size_mb_per_format": args.size_mb,
        "repeat": args.repeat,
        "throughput": speed,
        "detection": found,
        "samples": {
            "malicious": len(MALICIOUS_SAMPLES),
            "benign": len(BENIGN_SAMPLES),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
