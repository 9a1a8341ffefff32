"""The `local` provider and its nvidia-smi parsers.

The parsers run on captured nvidia-smi outputs. The provider runs against this real
machine (psutil, hostname, a real child process); only the GPU binary is replaced, by a
small executable script written into tmp_path, since the machines running these tests
have no GPU. Everything else the provider reads is real.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import stat
import sys
from pathlib import Path

import psutil
import pytest

from control_plane.clusters.providers.base import (
    ClusterProvider,
    ClusterUnreachable,
    InvalidClusterConfig,
)
from control_plane.clusters.providers.local import (
    LocalProvider,
    allocatable_cpu,
    parse_cuda_version,
    parse_gpu_query,
)
from workflows.contracts.clusters import ClusterKind, Platform

MIB = 1024 * 1024

# `nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version
#  --format=csv,noheader,nounits` on an 8 × H100 node with two GPUs busy.
H100_NODE = """\
0, NVIDIA H100 80GB HBM3, 81559, 0, 550.54.15
1, NVIDIA H100 80GB HBM3, 81559, 0, 550.54.15
2, NVIDIA H100 80GB HBM3, 81559, 71234, 550.54.15
3, NVIDIA H100 80GB HBM3, 81559, 1, 550.54.15
4, NVIDIA H100 80GB HBM3, 81559, 0, 550.54.15
5, NVIDIA H100 80GB HBM3, 81559, 80110, 550.54.15
6, NVIDIA H100 80GB HBM3, 81559, 0, 550.54.15
7, NVIDIA H100 80GB HBM3, 81559, 0, 550.54.15
"""

# A workstation with two different cards; the display card holds ~1.2 GiB (5% of 24 GiB
# is ~1.2 GiB, so it is just under the busy threshold).
WORKSTATION = """\
0, NVIDIA GeForce RTX 4090, 24564, 1180, 560.35.03
1, NVIDIA RTX A6000, 49140, 4, 560.35.03
2, NVIDIA GeForce RTX 4090, 24564, 9000, 560.35.03
"""

# Unified-memory systems (e.g. GB10) report no dedicated memory.
NO_MEMORY = "0, NVIDIA GB10, [N/A], [N/A], 580.95.05\n"

BANNER = """\
Tue Mar 12 10:04:31 2024
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
| N/A   31C    P0             70W /  700W |       0MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""

# Captured on an H100 machine (driver 580): the query output, and the banner's head with
# the trailing spaces of its date line trimmed.
CAPTURED_H100_QUERY = "0, NVIDIA H100 80GB HBM3, 81559, 0, 580.159.04\n"
CAPTURED_H100_BANNER = """\
Thu Nov 26 05:56:51 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:06.0 Off |                    0 |
| N/A   41C    P0            106W /  700W |       0MiB /  81559MiB |      0%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+
"""

OLD_BANNER = "| NVIDIA-SMI 525.85.12    Driver Version: 525.85.12    CUDA Version: 12.0     |\n"

DRIVER_FAILURE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


def script(tmp_path: Path, body: str, name: str = "nvidia-smi") -> str:
    """An executable Python script (standing in for nvidia-smi); returns its path."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport sys, time\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def working_smi(tmp_path: Path, query: str = H100_NODE, banner: str = BANNER) -> str:
    return script(
        tmp_path,
        f"if any(a.startswith('--query-gpu=') for a in sys.argv[1:]):\n"
        f"    sys.stdout.write({query!r})\n"
        f"else:\n"
        f"    sys.stdout.write({banner!r})\n",
    )


class TestParseGpuQuery:
    def test_identical_gpus_form_one_group(self) -> None:
        (group,) = parse_gpu_query(H100_NODE)
        assert group.vendor == "NVIDIA"
        assert group.model == "NVIDIA H100 80GB HBM3"
        assert group.memory_mb == 81559
        assert group.count == 8
        # GPUs 2 and 5 hold most of their memory; GPU 3's 1 MiB is the driver's.
        assert group.allocatable == 6
        assert group.driver_version == "550.54.15"
        assert group.cuda_version is None

    def test_captured_h100(self) -> None:
        (group,) = parse_gpu_query(CAPTURED_H100_QUERY)
        assert (group.model, group.memory_mb, group.count, group.allocatable) == (
            "NVIDIA H100 80GB HBM3",
            81559,
            1,
            1,
        )
        assert group.driver_version == "580.159.04"

    def test_mixed_models_form_groups_in_order_of_appearance(self) -> None:
        rtx, a6000 = parse_gpu_query(WORKSTATION)
        assert (rtx.model, rtx.memory_mb, rtx.count, rtx.allocatable) == (
            "NVIDIA GeForce RTX 4090",
            24564,
            2,
            1,
        )
        assert (a6000.model, a6000.memory_mb, a6000.count, a6000.allocatable) == (
            "NVIDIA RTX A6000",
            49140,
            1,
            1,
        )

    def test_unavailable_values_give_unknown_memory_and_driver(self) -> None:
        (gb10,) = parse_gpu_query("0, NVIDIA GB10, [N/A], [Not Supported], [N/A]\n")
        assert gb10.memory_mb == 0
        assert gb10.driver_version is None
        # Usage unknown: counted free rather than unplaceable forever.
        assert (gb10.count, gb10.allocatable) == (1, 1)

    def test_unknown_usage_with_known_total_counts_as_free(self) -> None:
        (group,) = parse_gpu_query("0, Tesla T4, 15360, [N/A], 535.104.05\n")
        assert (group.memory_mb, group.allocatable) == (15360, 1)

    def test_same_model_with_different_memory_are_separate_groups(self) -> None:
        groups = parse_gpu_query(
            "0, NVIDIA A100-SXM4-40GB, 40960, 0, 535.1\n"
            "1, NVIDIA A100-SXM4-40GB, 40960, 0, 535.1\n"
            "2, NVIDIA A100-SXM4-40GB, [N/A], 0, 535.1\n"
        )
        assert [(g.memory_mb, g.count) for g in groups] == [(40960, 2), (0, 1)]

    def test_a_comma_in_the_name_is_kept(self) -> None:
        (group,) = parse_gpu_query("0, Quadro, Special Edition, 8192, 10, 470.1\n")
        assert group.model == "Quadro, Special Edition"
        assert group.memory_mb == 8192

    @pytest.mark.parametrize("text", ["", "\n\n", "   \n", "No devices were found\n"])
    def test_empty_or_non_gpu_output_gives_no_gpus(self, text: str) -> None:
        assert parse_gpu_query(text) == []

    def test_windows_line_endings(self) -> None:
        (group,) = parse_gpu_query(
            "0, NVIDIA L4, 23034, 0, 550.1\r\n1, NVIDIA L4, 23034, 0, 550.1\r\n"
        )
        assert (group.count, group.driver_version) == (2, "550.1")


class TestParseCudaVersion:
    def test_current_banner(self) -> None:
        assert parse_cuda_version(BANNER) == "12.4"

    def test_captured_h100_banner(self) -> None:
        assert parse_cuda_version(CAPTURED_H100_BANNER) == "13.0"

    def test_older_banner(self) -> None:
        assert parse_cuda_version(OLD_BANNER) == "12.0"

    @pytest.mark.parametrize(
        "text",
        [
            "",
            DRIVER_FAILURE,
            "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: N/A |",
        ],
    )
    def test_absent(self, text: str) -> None:
        assert parse_cuda_version(text) is None


class TestAllocatableCpu:
    def test_idle_machine_offers_every_core(self) -> None:
        assert allocatable_cpu(8, 0.0) == 8.0

    def test_load_is_subtracted_and_rounded(self) -> None:
        assert allocatable_cpu(8, 2.37) == 5.6

    def test_overload_never_goes_negative(self) -> None:
        assert allocatable_cpu(4, 12.0) == 0.0

    def test_no_cores(self) -> None:
        assert allocatable_cpu(0, 1.0) == 0.0


class TestLocalProviderOnThisMachine:
    def test_satisfies_the_protocol(self) -> None:
        provider: ClusterProvider = LocalProvider()
        assert provider.kind is ClusterKind.LOCAL

    async def test_connect_identifies_the_host(self) -> None:
        info = await LocalProvider().connect()
        assert info.server_url == f"local://{socket.gethostname()}"
        assert info.platform is Platform.LOCAL
        assert info.version == platform.platform()

    async def test_discover_reports_one_ready_node_with_real_numbers(self) -> None:
        inventory = await LocalProvider().discover()
        assert inventory.connection.platform is Platform.LOCAL
        (node,) = inventory.nodes
        memory = psutil.virtual_memory()
        assert node.name == socket.gethostname()
        assert node.ready
        assert node.cpu_cores == psutil.cpu_count()
        assert 0 <= node.allocatable_cpu <= node.cpu_cores
        assert node.memory_mb == memory.total // MIB
        # Available memory moves between two reads; allow a small drift.
        assert abs(node.allocatable_memory_mb - memory.available // MIB) <= max(
            256, node.memory_mb // 20
        )
        assert 0 < node.allocatable_memory_mb <= node.memory_mb
        assert node.labels == {
            "cp/os": platform.system().lower(),
            "cp/arch": platform.machine(),
        }

    @pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
    async def test_discover_without_nvidia_smi_has_no_gpus_and_no_fault(self) -> None:
        (node,) = (await LocalProvider().discover()).nodes
        assert node.accelerators == []
        assert node.reason == ""

    async def test_missing_binary_path_is_no_gpus_not_an_error(self, tmp_path: Path) -> None:
        provider = LocalProvider(nvidia_smi=str(tmp_path / "absent" / "nvidia-smi"))
        (node,) = (await provider.discover()).nodes
        assert (node.ready, node.accelerators, node.reason) == (True, [], "")

    async def test_smoke_check_starts_a_process(self) -> None:
        result = await LocalProvider().smoke_check()
        assert result == f"started a process with {sys.executable}: ok"

    async def test_teardown_removes_nothing(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        provider = LocalProvider(work_dir=work)
        await provider.prepare()
        (work / "weights.bin").write_bytes(b"x")
        assert await provider.teardown() == []
        assert (work / "weights.bin").exists()


class TestLocalProviderWithFakeNvidiaSmi:
    async def test_gpus_and_cuda_version_are_reported(self, tmp_path: Path) -> None:
        provider = LocalProvider(nvidia_smi=working_smi(tmp_path))
        (node,) = (await provider.discover()).nodes
        (gpu,) = node.accelerators
        assert (gpu.model, gpu.count, gpu.allocatable) == ("NVIDIA H100 80GB HBM3", 8, 6)
        assert gpu.driver_version == "550.54.15"
        assert gpu.cuda_version == "12.4"
        assert node.ready
        assert node.reason == ""

    async def test_captured_h100_outputs(self, tmp_path: Path) -> None:
        smi = working_smi(tmp_path, CAPTURED_H100_QUERY, CAPTURED_H100_BANNER)
        (node,) = (await LocalProvider(nvidia_smi=smi).discover()).nodes
        (gpu,) = node.accelerators
        assert (gpu.model, gpu.allocatable, gpu.cuda_version) == (
            "NVIDIA H100 80GB HBM3",
            1,
            "13.0",
        )

    async def test_mixed_models(self, tmp_path: Path) -> None:
        provider = LocalProvider(nvidia_smi=working_smi(tmp_path, WORKSTATION, OLD_BANNER))
        (node,) = (await provider.discover()).nodes
        assert [(g.model, g.count, g.cuda_version) for g in node.accelerators] == [
            ("NVIDIA GeForce RTX 4090", 2, "12.0"),
            ("NVIDIA RTX A6000", 1, "12.0"),
        ]

    async def test_banner_failure_keeps_gpus_without_cuda_version(self, tmp_path: Path) -> None:
        smi = script(
            tmp_path,
            f"if len(sys.argv) > 1:\n    sys.stdout.write({NO_MEMORY!r})\nelse:\n    sys.exit(3)\n",
        )
        (node,) = (await LocalProvider(nvidia_smi=smi).discover()).nodes
        (gpu,) = node.accelerators
        assert (gpu.model, gpu.memory_mb, gpu.cuda_version) == ("NVIDIA GB10", 0, None)

    async def test_driver_failure_is_no_gpus_with_a_reason(self, tmp_path: Path) -> None:
        smi = script(tmp_path, f"sys.stdout.write({DRIVER_FAILURE!r})\nsys.exit(9)\n")
        (node,) = (await LocalProvider(nvidia_smi=smi).discover()).nodes
        assert node.accelerators == []
        assert node.ready
        assert "exit 9" in node.reason
        assert "couldn't communicate with the NVIDIA driver" in node.reason

    async def test_failure_message_on_stderr_is_used(self, tmp_path: Path) -> None:
        smi = script(tmp_path, "sys.stderr.write('Failed to initialize NVML\\n')\nsys.exit(255)\n")
        (node,) = (await LocalProvider(nvidia_smi=smi).discover()).nodes
        assert node.accelerators == []
        assert "Failed to initialize NVML" in node.reason

    async def test_hung_binary_is_killed_and_reported(self, tmp_path: Path) -> None:
        smi = script(tmp_path, "time.sleep(30)\n")
        provider = LocalProvider(nvidia_smi=smi, command_timeout=0.5)
        (node,) = (await provider.discover()).nodes
        assert node.accelerators == []
        assert "did not answer within 0.5 s" in node.reason

    async def test_non_executable_binary_is_reported(self, tmp_path: Path) -> None:
        # No exec bit at all: even root's execve is refused.
        smi = tmp_path / "nvidia-smi"
        smi.write_text("not a program")
        (node,) = (await LocalProvider(nvidia_smi=str(smi)).discover()).nodes
        assert node.accelerators == []
        assert "could not be started" in node.reason


class TestPrepare:
    async def test_without_work_dir_nothing_is_created(self) -> None:
        result = await LocalProvider().prepare()
        assert result.created == []
        assert result.detail

    async def test_creates_the_work_dir_once(self, tmp_path: Path) -> None:
        work = tmp_path / "data" / "replicas"
        provider = LocalProvider(work_dir=work)
        first = await provider.prepare()
        assert work.is_dir()
        assert first.created == [str(work)]
        assert first.detail == f"work directory {work} ready"
        second = await provider.prepare()
        assert second.created == []
        assert second.detail == f"work directory {work} ready"
        assert list(work.iterdir()) == []  # the write probe leaves nothing behind

    async def test_existing_dir_is_not_reported_created(self, tmp_path: Path) -> None:
        result = await LocalProvider(work_dir=tmp_path).prepare()
        assert result.created == []

    async def test_a_file_in_the_way_is_a_config_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(InvalidClusterConfig, match="work directory"):
            await LocalProvider(work_dir=blocker / "sub").prepare()

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
    async def test_an_unwritable_dir_is_a_config_error(self, tmp_path: Path) -> None:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(InvalidClusterConfig, match="not usable"):
                await LocalProvider(work_dir=locked).prepare()
        finally:
            locked.chmod(0o700)


class TestSmokeCheckFailures:
    async def test_failing_interpreter_is_unreachable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        broken = script(tmp_path, "sys.stderr.write('boom\\n')\nsys.exit(1)\n", "python")
        monkeypatch.setattr(sys, "executable", broken)
        with pytest.raises(ClusterUnreachable, match=r"failed \(exit 1\): boom"):
            await LocalProvider().smoke_check()

    async def test_missing_interpreter_is_unreachable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sys, "executable", str(tmp_path / "python-gone"))
        with pytest.raises(ClusterUnreachable, match="could not start a process"):
            await LocalProvider().smoke_check()
