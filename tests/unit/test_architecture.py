"""Architecture lint: workflow code stays deterministic, and only the session helpers
commit. Runs over the source tree with `ast`, so it needs nothing running."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Modules whose import means I/O (or settings) inside workflow code.
BANNED_IMPORTS = {
    "aiohttp",
    "asyncpg",
    "boto3",
    "httpx",
    "huggingface_hub",
    "kubernetes",
    "minio",
    "os",
    "pathlib",
    "psutil",
    "random",
    "redis",
    "requests",
    "secrets",
    "socket",
    "sqlalchemy",
    "sqlmodel",
    "subprocess",
    "threading",
    "time",
    "control_plane.core.config",
    "control_plane.core.db",
    "control_plane.core.redis",
    "control_plane.core.storage",
}
# Dotted call names that read a clock, randomness or the environment.
BANNED_CALLS = {
    "datetime.now",
    "datetime.utcnow",
    "datetime.today",
    "date.today",
    "datetime.datetime.now",
    "datetime.datetime.utcnow",
    "uuid.uuid1",
    "uuid.uuid4",
    "uuid4",
    "uuid1",
    "time.time",
    "time.monotonic",
    "time.sleep",
    "open",
    "getenv",
    "os.getenv",
}
BANNED_ATTRIBUTES = {"os.environ", "environ"}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def workflow_violations(source: str, filename: str = "<src>") -> list[str]:
    problems: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if any(name == banned or name.startswith(banned + ".") for banned in BANNED_IMPORTS):
                problems.append(f"{filename}:{line} imports {name}")
        if isinstance(node, ast.Call) and dotted(node.func) in BANNED_CALLS:
            problems.append(f"{filename}:{line} calls {dotted(node.func)}()")
        if isinstance(node, ast.Attribute) and dotted(node) in BANNED_ATTRIBUTES:
            problems.append(f"{filename}:{line} reads {dotted(node)}")
    return problems


def commit_violations(source: str, filename: str = "<src>") -> list[str]:
    return [
        f"{filename}:{node.lineno} calls commit()"
        for node in ast.walk(ast.parse(source, filename))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "commit"
    ]


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


class TestWorkflowDeterminism:
    def test_workflow_modules_use_no_clock_randomness_env_or_io(self) -> None:
        problems = [
            problem
            for path in python_files("workflows")
            for problem in workflow_violations(path.read_text(), str(path.relative_to(ROOT)))
        ]
        assert problems == []

    def test_the_lint_catches_each_kind_of_violation(self) -> None:
        bad = (
            "import os\nimport httpx\nfrom datetime import datetime\nimport uuid\n"
            "x = datetime.now()\ny = uuid.uuid4()\nz = os.environ['A']\n"
        )
        problems = workflow_violations(bad)
        assert any("imports os" in p for p in problems)
        assert any("imports httpx" in p for p in problems)
        assert any("datetime.now()" in p for p in problems)
        assert any("uuid.uuid4()" in p for p in problems)
        assert any("reads os.environ" in p for p in problems)


class TestCommitsOnlyInSessionHelpers:
    ALLOWED = {
        ROOT / "control_plane" / "core" / "db.py",
        ROOT / "control_plane" / "migrations" / "env.py",
    }

    def test_nothing_else_commits(self) -> None:
        problems = [
            problem
            for path in python_files("control_plane", "api", "activities", "workers")
            if path not in self.ALLOWED
            for problem in commit_violations(path.read_text(), str(path.relative_to(ROOT)))
        ]
        assert problems == []

    def test_the_lint_catches_a_commit(self) -> None:
        assert commit_violations("async def f(s):\n    await s.commit()\n") == [
            "<src>:2 calls commit()"
        ]
