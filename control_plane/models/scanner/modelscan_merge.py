"""Optional second opinion: run `modelscan` (when installed) and merge its issues.

Its failures never fail our scan: they become an INFO finding. modelscan walks pickles
with `pickletools` (no loading), so running it in-process is safe.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from workflows.contracts.models import Finding, Severity

_SEVERITIES = {
    "CRITICAL": Severity.CRITICAL,
    "HIGH": Severity.HIGH,
    "MEDIUM": Severity.MEDIUM,
    "LOW": Severity.LOW,
}


def _info(file: str, code: str, detail: str) -> Finding:
    return Finding(severity=Severity.INFO, file=file, code=code, detail=detail)


def modelscan_findings(path: Path) -> list[Finding]:
    """modelscan's issues about `path` as findings coded `modelscan.<operator>`."""
    try:
        from modelscan.modelscan import ModelScan
    except ImportError:
        return [_info(path.name, "modelscan.unavailable", "modelscan is not installed")]
    # Its console logging would interleave with our output.
    logging.getLogger("modelscan").setLevel(logging.CRITICAL)
    try:
        report: dict[str, Any] = ModelScan().scan(path)
    except Exception as err:  # a third-party failure must not fail our scan
        return [_info(path.name, "modelscan.error", f"{type(err).__name__}: {err}")]
    findings: list[Finding] = []
    for issue in report.get("issues") or []:
        if not isinstance(issue, dict):
            continue
        operator = str(issue.get("operator") or "issue")
        module = str(issue.get("module") or "")
        findings.append(
            Finding(
                severity=_SEVERITIES.get(str(issue.get("severity")), Severity.MEDIUM),
                file=str(issue.get("source") or path.name),
                code=f"modelscan.{operator}",
                detail=str(issue.get("description") or f"{module}.{operator}"),
            )
        )
    for error in report.get("errors") or []:
        if isinstance(error, dict):
            source = str(error.get("source") or path.name)
            findings.append(_info(source, "modelscan.error", str(error.get("description"))))
    return findings
