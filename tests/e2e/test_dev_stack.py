"""`cpctl dev` as a developer runs it: a real supervisor process with every real child.

One stack is shared by the tests that only look at a running stack; the persistence test
runs its own (it stops and restarts the supervisor on one data directory).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import temporalio.api.operatorservice.v1 as operator
from temporalio.client import Client, WorkflowExecutionStatus

from control_plane.devstack.services import free_ports
from workflows.contracts.common import SEARCH_ATTRIBUTE_KEYS

pytestmark = pytest.mark.slow

READY_TIMEOUT = 180.0
STOP_TIMEOUT = 40.0


class DevStack:
    """One `cpctl dev` supervisor process on a data directory and free ports."""

    def __init__(self, data_dir: Path, *, api_port: int | None = None) -> None:
        self.data_dir = data_dir
        ports = free_ports(4)
        self.api_port = api_port or ports[0]
        self.temporal_port = ports[1]
        self.temporal_ui_port = ports[2]
        self.gateway_port = ports[3]
        self.process: subprocess.Popen[bytes] | None = None
        self.output_file: Path | None = None
        self.last_state: dict[str, Any] = {}
        self._runs = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "dev-stack.json"

    def env(self) -> dict[str, str]:
        # A developer's CP_* variables (an external database, Temporal...) must not leak in.
        env = {key: value for key, value in os.environ.items() if not key.startswith("CP_")}
        env.update(
            CP_DATA_DIR=str(self.data_dir),
            CP_API__PORT=str(self.api_port),
            CP_GATEWAY__PORT=str(self.gateway_port),
            CP_DEV__TEMPORAL_PORT=str(self.temporal_port),
            CP_DEV__TEMPORAL_UI_PORT=str(self.temporal_ui_port),
            CP_DEV__RESTART_MIN_SECONDS="0.5",
            PYTHONUNBUFFERED="1",
        )
        return env

    def launch(self) -> subprocess.Popen[bytes]:
        """Start a supervisor; its stdout and stderr go to a file next to the data dir."""
        self._runs += 1
        self.output_file = self.data_dir.parent / f"{self.data_dir.name}-run{self._runs}.out"
        with self.output_file.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "control_plane.cli", "dev"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                cwd=self.data_dir.parent,
            )
        return process

    def start(self) -> None:
        self.process = self.launch()
        self.wait_ready()

    def output(self) -> str:
        return self.output_file.read_text(errors="replace") if self.output_file else ""

    def login(self) -> dict[str, str]:
        """Sign in with the bootstrap admin the banner printed on this run."""
        found = re.search(r"bootstrap admin: (\S+)\s+password: (\S+)", self.output())
        assert found, self.output()
        response = httpx.post(
            f"{self.api_url}/api/v1/auth/token",
            data={"username": found.group(1), "password": found.group(2)},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def diagnostics(self) -> str:
        tails = []
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            tails.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join([f"--- supervisor output ---\n{self.output()}", *tails])

    def state(self) -> dict[str, Any]:
        """dev-stack.json as written by this supervisor ({} before it exists)."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        if self.process is None or state.get("supervisor_pid") != self.process.pid:
            return {}
        self.last_state = state
        return state

    def child_pid(self, name: str) -> int | None:
        pid = self.state().get("children", {}).get(name, {}).get("pid")
        return int(pid) if pid is not None else None

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"cpctl dev exited with {self.process.returncode}\n{self.diagnostics()}"
                )
            if self.state().get("status") == "ready":
                try:
                    if httpx.get(f"{self.api_url}/readyz", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        pytest.fail(f"cpctl dev was not ready within {READY_TIMEOUT} s\n{self.diagnostics()}")

    def recorded_processes(self) -> list[psutil.Process]:
        found = []
        for info in self.last_state.get("children", {}).values():
            try:
                process = psutil.Process(info["pid"])
                if process.create_time() == info["create_time"]:
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the supervisor and wait for it; the exit code."""
        assert self.process is not None
        self.state()
        self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cpctl dev did not stop within {STOP_TIMEOUT} s\n{self.diagnostics()}")

    def close(self) -> None:
        """Whatever a failed test left running goes; never raises."""
        if self.process is not None and self.process.poll() is None:
            self.state()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for process in self.recorded_processes():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(path: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline and alive(process):
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


def wait_for(condition: Any, timeout: float, what: str, stack: DevStack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout} s\n{stack.diagnostics()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    dev = DevStack(tmp_path_factory.mktemp("dev-shared") / "data")
    dev.data_dir.mkdir()
    try:
        dev.start()
        yield dev
    finally:
        dev.close()


class TestRunningStack:
    @pytest.mark.timeout(300)
    def test_every_api_url_answers(self, stack: DevStack) -> None:
        for path in ("/healthz", "/readyz", "/docs", "/metrics"):
            response = httpx.get(f"{stack.api_url}{path}", timeout=10)
            assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"

    @pytest.mark.timeout(300)
    def test_dev_stack_json_describes_the_stack(self, stack: DevStack) -> None:
        state = stack.state()
        urls = state["urls"]
        assert urls["api"] == stack.api_url
        assert urls["api_docs"] == f"{stack.api_url}/docs"
        assert urls["readiness"] == f"{stack.api_url}/readyz"
        assert urls["temporal_ui"] == f"http://127.0.0.1:{stack.temporal_ui_port}"
        assert urls["temporal_address"] == f"127.0.0.1:{stack.temporal_port}"
        assert urls["redis"].startswith("unix://")
        assert urls["postgres"].startswith("postgresql://postgres@/")
        assert urls["gateway"] == f"http://127.0.0.1:{stack.gateway_port}/v1"
        assert httpx.get(f"http://127.0.0.1:{stack.gateway_port}/readyz").status_code == 200
        unauthenticated = httpx.get(f"{urls['gateway']}/models")
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"]["type"] == "authentication_error"
        assert state["data_dir"] == str(stack.data_dir.resolve())
        expected = {"temporal", "postgres", "redis", "api", "gateway"} | {
            f"worker-{queue}"
            for queue in (
                "cp-orchestration",
                "cp-cluster",
                "cp-model",
                "cp-deploy",
                "cp-benchmark",
                "cp-sync",
            )
        }
        assert set(state["children"]) == expected
        for name, child in state["children"].items():
            assert psutil.pid_exists(child["pid"]), name
            assert Path(child["log"]).parent == stack.data_dir.resolve() / "logs"

    @pytest.mark.timeout(300)
    def test_banner_lists_every_url(self, stack: DevStack) -> None:
        output = stack.output()
        urls = stack.state()["urls"]
        for key in ("api", "api_docs", "readiness", "gateway", "temporal_ui", "postgres", "redis"):
            assert urls[key] in output, key
        assert str(stack.data_dir.resolve() / "logs") in output
        assert "bootstrap admin: admin" in output
        assert "password" not in (stack.data_dir / "logs" / "migrations.log").read_text()

    @pytest.mark.timeout(300)
    def test_this_machine_is_onboarded_as_the_local_cluster(self, stack: DevStack) -> None:
        assert "local cluster: onboarding local" in stack.output()
        headers = stack.login()

        def available() -> dict[str, Any] | None:
            response = httpx.get(f"{stack.api_url}/api/v1/clusters", headers=headers, timeout=10)
            items: list[dict[str, Any]] = response.json()["items"]
            return items[0] if items and items[0]["status"] == "available" else None

        cluster = wait_for(available, 90, "the local cluster did not become available", stack)
        assert cluster["name"] == "local"
        assert cluster["kind"] == "local"
        assert cluster["capacity"]["cpu_cores"] == psutil.cpu_count()
        total_mb = psutil.virtual_memory().total // (1024 * 1024)
        assert abs(cluster["capacity"]["memory_mb"] - total_mb) <= 1

    @pytest.mark.timeout(300)
    def test_temporal_ui_answers(self, stack: DevStack) -> None:
        response = httpx.get(stack.state()["urls"]["temporal_ui"], timeout=10)
        assert response.status_code == 200

    @pytest.mark.timeout(300)
    async def test_temporal_has_the_custom_search_attributes(self, stack: DevStack) -> None:
        client = await Client.connect(stack.state()["urls"]["temporal_address"])
        listed = await client.operator_service.list_search_attributes(
            operator.ListSearchAttributesRequest(namespace="default")
        )
        assert {key.name for key in SEARCH_ATTRIBUTE_KEYS} <= set(listed.custom_attributes)

    @pytest.mark.timeout(300)
    def test_a_second_supervisor_on_the_same_data_dir_is_refused(self, stack: DevStack) -> None:
        second = subprocess.run(
            [sys.executable, "-m", "control_plane.cli", "dev"],
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert "already running" in second.stderr
        assert str(stack.data_dir.resolve()) in second.stderr
        assert httpx.get(f"{stack.api_url}/readyz", timeout=10).status_code == 200

    @pytest.mark.timeout(300)
    def test_a_killed_worker_is_restarted(self, stack: DevStack) -> None:
        name = "worker-cp-sync"
        old_pid = stack.child_pid(name)
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> int | None:
            pid = stack.child_pid(name)
            return pid if pid not in (None, old_pid) else None

        new_pid = wait_for(restarted, 60, f"{name} was not restarted", stack)
        assert psutil.Process(new_pid).is_running()
        assert stack.state()["children"][name]["restarts"] >= 1
        assert f"{name} (pid {old_pid}) exited with signal SIGKILL" in stack.output()


class TestLifecycle:
    @pytest.mark.timeout(300)
    def test_a_busy_port_stops_it_before_anything_starts(self, tmp_path: Path) -> None:
        dev = DevStack(tmp_path / "data")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.bind(("127.0.0.1", dev.api_port))
            busy.listen()
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "control_plane.cli", "dev"],
                env=dev.env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            took = time.monotonic() - started
        assert result.returncode == 2
        assert f"port {dev.api_port} (API, CP_API__PORT) is already in use" in result.stderr
        assert took < 20
        for started_dir in ("postgres", "temporal", "redis", "logs"):
            assert not (dev.data_dir / started_dir).exists(), started_dir
        assert not (dev.data_dir / "dev-stack.json").exists()
        assert processes_mentioning(dev.data_dir.resolve()) == []

    @pytest.mark.timeout(300)
    def test_sigterm_stops_everything_and_data_survives_a_restart(self, tmp_path: Path) -> None:
        (tmp_path / "data").mkdir()
        dev = DevStack(tmp_path / "data")
        try:
            dev.start()
            headers = dev.login()
            unauthenticated = httpx.post(f"{dev.api_url}/api/v1/system/diagnostics", json={})
            assert unauthenticated.status_code == 401
            started = httpx.post(
                f"{dev.api_url}/api/v1/system/diagnostics", json={}, headers=headers, timeout=30
            )
            assert started.status_code == 202, started.text
            workflow_id = started.json()["workflow_id"]

            def finished() -> dict[str, Any] | None:
                response = httpx.get(
                    f"{dev.api_url}/api/v1/workflows/{workflow_id}", headers=headers, timeout=10
                )
                run: dict[str, Any] = response.json()
                return run if response.status_code == 200 and run["status"] != "running" else None

            run = wait_for(finished, 90, "DiagnoseSystem did not finish", dev)
            assert run["status"] == "completed", run

            self._stop_cleanly(dev)

            dev.start()
            # The one-time password is shown on the first start only, and the local
            # cluster is onboarded once.
            assert "bootstrap admin:" not in dev.output()
            assert "nothing to onboard" in dev.output()
            clusters = httpx.get(f"{dev.api_url}/api/v1/clusters", headers=headers, timeout=10)
            assert [c["name"] for c in clusters.json()["items"]] == ["local"]
            response = httpx.get(
                f"{dev.api_url}/api/v1/workflows/{workflow_id}", headers=headers, timeout=10
            )
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "completed"
            assert response.json()["run_id"] == run["run_id"]
            description = asyncio.run(self._describe(dev, workflow_id))
            assert description == WorkflowExecutionStatus.COMPLETED

            self._stop_cleanly(dev, signal.SIGINT)
        finally:
            dev.close()

    @pytest.mark.timeout(300)
    def test_the_next_start_stops_what_a_killed_supervisor_left(self, tmp_path: Path) -> None:
        (tmp_path / "data").mkdir()
        dev = DevStack(tmp_path / "data")
        try:
            dev.start()
            assert dev.process is not None
            dev.state()
            dev.process.kill()
            dev.process.wait(10)
            orphans = dev.recorded_processes()
            assert len(orphans) == 11  # infrastructure, API, gateway, six workers

            dev.start()
            assert "left over by a previous run" in dev.output()
            assert [process.pid for process in orphans if alive(process)] == []
            assert dev.stop() == 0
        finally:
            dev.close()

    @staticmethod
    def _stop_cleanly(dev: DevStack, signum: int = signal.SIGTERM) -> None:
        assert dev.process is not None
        started = time.monotonic()
        assert dev.stop(signum) == 0, dev.diagnostics()
        assert time.monotonic() - started < STOP_TIMEOUT
        recorded = dev.last_state["children"]
        assert len(recorded) == 11
        survivors = [process.pid for process in dev.recorded_processes() if alive(process)]
        assert survivors == [], dev.diagnostics()
        assert processes_mentioning(dev.data_dir.resolve()) == []
        assert not dev.state_file.exists()
        assert "everything stopped" in dev.output()

    @staticmethod
    async def _describe(dev: DevStack, workflow_id: str) -> WorkflowExecutionStatus | None:
        client = await Client.connect(dev.last_state["urls"]["temporal_address"])
        return (await client.get_workflow_handle(workflow_id).describe()).status
