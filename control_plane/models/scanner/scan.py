"""Scan model files: dispatch on content (magic bytes) first, then on the extension.

Nothing is ever loaded: pickles are walked opcode by opcode, safetensors/GGUF/`.npy`
headers parsed, zips listed and their members dispatched in turn. Tensor bytes are not
read at all (safetensors data, GGUF data, `.npy` arrays, torch storages), so the cost
is the size of the headers and pickles, not of the weights.

A file is read through a seekable binary stream. `scan_file` opens a local file;
`scan_stream` takes any stream: a seekable one (local file, an object store's ranged
reader) is scanned in place, a non-seekable one (an HTTP body) is first spooled to a
temporary file, the common denominator, since zips keep their directory at the end.
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO, cast

from control_plane.models.scanner._io import (
    Budget,
    BudgetExceeded,
    MeteredReader,
    Reader,
    ScanLimits,
    Truncated,
)
from control_plane.models.scanner.gguf_header import MAGIC as GGUF_MAGIC
from control_plane.models.scanner.gguf_header import check_gguf
from control_plane.models.scanner.numpy_files import MAGIC as NPY_MAGIC
from control_plane.models.scanner.numpy_files import NpyError, check_npy_header, read_npy_header
from control_plane.models.scanner.pickles import looks_like_pickle_header, scan_pickle
from control_plane.models.scanner.safetensors_header import check_safetensors
from control_plane.models.scanner.version import SCANNER_NAME, SCANNER_VERSION
from workflows.contracts.models import Finding, ScanReport, Severity, Verdict

PICKLE_EXTENSIONS = frozenset(
    {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".dat"}
)
# Extensions other runtimes use for raw weights too (CTranslate2, ONNX external data):
# such a file that does not parse as a pickle and imports nothing is not one.
_AMBIGUOUS = frozenset({".bin", ".dat"})
_PYTHON = frozenset({".py", ".pyc", ".pyo", ".pyw"})
_SCRIPTS = frozenset({".sh", ".bash", ".zsh", ".bat", ".cmd", ".ps1"})
# Model formats that can carry code (Keras Lambda layers, TF graphs with file ops) and
# that this scanner does not analyse: reported low, so a reviewer knows.
_NOT_ANALYSED = frozenset({".h5", ".hdf5", ".pb", ".onnx", ".tflite", ".msgpack", ".mlmodel"})
_SNIFF = 4096
_SPOOL_IN_MEMORY = 64 << 20
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    OverflowError,
    KeyError,
    IndexError,
    UnicodeDecodeError,
    TypeError,
    Truncated,
)

_RANK = {
    Severity.INFO: 0,
    Severity.LOW: 1,
    Severity.MEDIUM: 2,
    Severity.HIGH: 3,
    Severity.CRITICAL: 4,
}


def severity_rank(severity: Severity) -> int:
    return _RANK[severity]


def verdict_for(findings: Iterable[Finding]) -> Verdict:
    """MALICIOUS with any CRITICAL finding, SUSPICIOUS with any other finding of MEDIUM or
    above, CLEAN otherwise (LOW and INFO findings are notes)."""
    worst = max((_RANK[finding.severity] for finding in findings), default=0)
    if worst >= _RANK[Severity.CRITICAL]:
        return Verdict.MALICIOUS
    if worst >= _RANK[Severity.MEDIUM]:
        return Verdict.SUSPICIOUS
    return Verdict.CLEAN


def _executable(head: bytes) -> str | None:
    if head.startswith(b"\x7fELF"):
        return "an ELF executable or shared library"
    if head.startswith(b"#!"):
        return "a script with a #! line"
    if head[:4] in (
        b"\xfe\xed\xfa\xce",
        b"\xfe\xed\xfa\xcf",
        b"\xce\xfa\xed\xfe",
        b"\xcf\xfa\xed\xfe",
    ):
        return "a Mach-O executable"
    if head[:4] == b"\xca\xfe\xba\xbe":
        return "a Mach-O universal binary or Java class"
    if head.startswith(b"MZ") and len(head) >= 64:
        (pe_offset,) = struct.unpack_from("<I", head, 0x3C)
        if head[pe_offset : pe_offset + 4] == b"PE\x00\x00":
            return "a Windows PE executable or DLL"
    return None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack_from("<Q", head)
    return 2 <= length <= size - 8 and head[8:9] == b"{"


def _storage_prefixes(names: Iterable[str]) -> set[str]:
    """Directories holding torch storages: `<archive>/data/` next to `<archive>/data.pkl`."""
    return {
        name[: -len("data.pkl")] + "data"
        for name in names
        if name == "data.pkl" or name.endswith("/data.pkl")
    }


def _spool(reader: Reader, size: int | None = None) -> IO[bytes]:
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    remaining = size
    while remaining is None or remaining > 0:
        data = reader.read(1 << 20 if remaining is None else min(remaining, 1 << 20))
        if not data:
            break
        spool.write(data)
        if remaining is not None:
            remaining -= len(data)
    spool.seek(0)
    return cast(IO[bytes], spool)


class _Scan:
    def __init__(self, limits: ScanLimits) -> None:
        self.limits = limits
        self.budget = Budget(limits.max_decompressed_bytes)
        self.findings: list[Finding] = []

    def add(self, severity: Severity, file: str, code: str, detail: str) -> None:
        self.findings.append(Finding(severity=severity, file=file, code=code, detail=detail))

    def object(self, name: str, reader: Reader, size: int, depth: int) -> None:
        """Scan one file or archive member; the reader is at its first byte."""
        ext = PurePosixPath(name.rsplit(":", 1)[-1]).suffix.lower()
        head = reader.read(_SNIFF)
        reader.seek(0)
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            self.archive(name, reader, size, depth)
        elif head.startswith(NPY_MAGIC):
            self.npy(name, reader, size, depth)
        elif ext in (".npy", ".npz"):
            # `np.load(allow_pickle=True)` unpickles whatever has neither magic.
            self.add(
                Severity.MEDIUM,
                name,
                "numpy.malformed",
                "neither .npy nor .npz: numpy would read it as a pickle",
            )
            self.pickle(name, reader, size, ext, head, depth)
        elif head.startswith(GGUF_MAGIC) or ext == ".gguf":
            findings, parsed = check_gguf(reader, name, size)
            self.findings.extend(findings)
            if not parsed and looks_like_pickle_header(head):
                reader.seek(0)
                self.pickle(name, reader, size, ext, head, depth)
        elif ext == ".safetensors" or _looks_like_safetensors(head, size):
            findings, parsed = check_safetensors(
                reader, name, size, max_header=self.limits.max_safetensors_header
            )
            self.findings.extend(findings)
            # A pickle renamed `.safetensors` does not load with safetensors, but a
            # loader that falls back to torch.load would run it.
            if not parsed and looks_like_pickle_header(head):
                reader.seek(0)
                self.pickle(name, reader, size, ext, head, depth)
        elif (kind := _executable(head)) is not None:
            self.add(Severity.HIGH, name, "code.executable", f"{kind}")
        elif ext in PICKLE_EXTENSIONS or looks_like_pickle_header(head):
            self.pickle(name, reader, size, ext, head, depth)
        elif ext in _PYTHON:
            self.add(
                Severity.MEDIUM,
                name,
                "code.python",
                "Python code (remote code the loader may be asked to trust)",
            )
        elif ext in _SCRIPTS:
            self.add(Severity.MEDIUM, name, "code.script", "a shell or batch script")
        elif ext in _NOT_ANALYSED:
            self.add(Severity.LOW, name, "format.not_analysed", f"{ext} files are not analysed")

    def pickle(
        self, name: str, reader: Reader, size: int, ext: str, head: bytes, depth: int
    ) -> None:
        before = len(self.findings)
        result = scan_pickle(reader, name, size=size, limits=self.limits, findings=self.findings)
        if not result.complete:
            headerless = not looks_like_pickle_header(head)
            if (
                ext in _AMBIGUOUS
                and headerless
                and not result.imports
                and len(self.findings) == before
            ):
                self.add(
                    Severity.INFO, name, "format.unrecognized", "not a pickle nor a known format"
                )
            else:
                self.add(Severity.MEDIUM, name, "pickle.malformed", result.error or "malformed")
        # A zip appended to a pickle file: torch.load reads the pickle (it checks the
        # magic at the start), zipfile-based tools read the archive. Scan both.
        if depth > 0:
            return
        reader.seek(0)
        if zipfile.is_zipfile(cast(IO[bytes], reader)):
            reader.seek(0)
            self.archive(name, reader, size, depth)

    def npy(self, name: str, reader: Reader, size: int, depth: int) -> None:
        try:
            header = read_npy_header(reader, self.limits.max_npy_header)
        except Truncated:
            self.add(Severity.MEDIUM, name, "numpy.truncated", "the file ends inside the header")
            return
        except NpyError as err:
            self.add(Severity.MEDIUM, name, "numpy.malformed", str(err))
            return
        if not header.has_objects:
            self.findings.extend(check_npy_header(header, name, size))
            return
        self.add(
            Severity.LOW,
            name,
            "numpy.object_array",
            f"dtype {header.descr!r} holds Python objects: the data is a pickle",
        )
        result = scan_pickle(
            reader,
            name,
            size=size - header.data_offset,
            limits=self.limits,
            findings=self.findings,
        )
        if not result.complete:
            self.add(Severity.MEDIUM, name, "pickle.malformed", result.error or "malformed")

    def archive(self, name: str, reader: Reader, size: int, depth: int) -> None:
        if depth >= self.limits.max_archive_depth:
            self.add(
                Severity.MEDIUM,
                name,
                "archive.depth",
                f"archive nested deeper than {self.limits.max_archive_depth} levels: not scanned",
            )
            return
        if depth > 0:
            # A member of an archive: reading a zip seeks back and forth, which a
            # compressed member can only do by decompressing again. Copy it out once.
            with _spool(reader, size) as spooled:
                self._zip(name, spooled, depth)
            return
        self._zip(name, reader, depth)

    def _zip(self, name: str, reader: Reader, depth: int) -> None:
        try:
            archive = zipfile.ZipFile(cast(IO[bytes], reader))
        except (*_ZIP_ERRORS, NotImplementedError, RuntimeError) as err:
            self.add(Severity.MEDIUM, name, "archive.malformed", f"not a readable zip: {err}")
            return
        with archive:
            infos = archive.infolist()
            if len(infos) > self.limits.max_archive_members:
                self.add(
                    Severity.MEDIUM,
                    name,
                    "archive.limit",
                    f"{len(infos)} members: more than the scan allows",
                )
                return
            storages = _storage_prefixes(info.filename for info in infos)
            for info in infos:
                if info.filename.endswith("/"):
                    continue
                member = f"{name}:{info.filename}"
                # torch reads storages as raw bytes, never unpickles them.
                if info.filename.rpartition("/")[0] in storages:
                    continue
                if (
                    info.file_size > self.limits.bomb_min_bytes
                    and info.file_size > info.compress_size * self.limits.bomb_ratio
                ):
                    self.add(
                        Severity.HIGH,
                        member,
                        "archive.bomb",
                        f"{info.compress_size} bytes claim to expand to {info.file_size}",
                    )
                    continue
                if not self._member(archive, info, member, depth):
                    return

    def _member(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str, depth: int
    ) -> bool:
        """Scan one member; False when the archive must not be read further."""
        try:
            with archive.open(info) as raw:
                # torch's zip reader skips CRC checks: a member with a wrong CRC still
                # loads there, so it must still be scanned here.
                setattr(raw, "_expected_crc", None)  # noqa: B010
                self.object(member, MeteredReader(raw, self.budget), info.file_size, depth + 1)
        except BudgetExceeded:
            self.add(
                Severity.MEDIUM,
                member,
                "archive.limit",
                f"more than {self.limits.max_decompressed_bytes} decompressed bytes: scan stopped",
            )
            return False
        except RuntimeError as err:
            self.add(Severity.MEDIUM, member, "archive.encrypted", f"cannot be read: {err}")
        except NotImplementedError as err:
            self.add(Severity.MEDIUM, member, "archive.unsupported", f"cannot be read: {err}")
        except _ZIP_ERRORS as err:
            self.add(Severity.MEDIUM, member, "archive.malformed", f"cannot be read: {err}")
        return True


def _is_seekable(reader: object) -> bool:
    seekable = getattr(reader, "seekable", None)
    return bool(seekable()) if callable(seekable) else True


def scan_stream(
    name: str, reader: Reader, size: int | None = None, *, limits: ScanLimits | None = None
) -> list[Finding]:
    """Findings for one file given as a binary stream (rewound first). `size` is the
    stream's length (taken from the stream when None). A stream that is not seekable is
    spooled to a temporary file first. I/O errors propagate; anything wrong with the
    content is a finding."""
    limits = limits or ScanLimits()
    if not _is_seekable(reader):
        with _spool(reader) as spooled:
            spooled.seek(0, os.SEEK_END)
            length = spooled.tell()
            spooled.seek(0)
            return scan_stream(name, spooled, length, limits=limits)
    if size is None:
        size = reader.seek(0, os.SEEK_END)
    reader.seek(0)
    scan = _Scan(limits)
    try:
        scan.object(name, reader, size, 0)
    except OSError:
        raise
    except Exception as err:  # a parser bug must not pass a file as clean
        scan.add(Severity.MEDIUM, name, "scan.error", f"{type(err).__name__}: {err}")
    return scan.findings


def scan_file(
    path: Path, *, name: str | None = None, limits: ScanLimits | None = None
) -> list[Finding]:
    """Findings for one local file; `name` (the path inside the model) defaults to the
    file name."""
    with Path(path).open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        return scan_stream(name or Path(path).name, handle, size, limits=limits)


def _files(root: Path) -> Iterable[tuple[str, Path]]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            full = Path(directory) / filename
            yield full.relative_to(root).as_posix(), full
        for dirname in dirnames:
            full = Path(directory) / dirname
            if full.is_symlink():
                yield full.relative_to(root).as_posix(), full


def scan_path(
    path: Path, *, merge_modelscan: bool = False, limits: ScanLimits | None = None
) -> ScanReport:
    """Scan a file or a directory (recursively; finding names are relative to it).
    Raises `OSError` when the path is missing or a file cannot be read."""
    path = Path(path)
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        files: Iterable[tuple[str, Path]] = [(path.name, path)]
    elif stat.S_ISDIR(mode):
        files = _files(path)
    else:
        raise OSError(f"not a regular file or a directory: {path}")
    findings: list[Finding] = []
    files_scanned = bytes_scanned = 0
    for relative, full in files:
        file_stat = full.stat()
        if not stat.S_ISREG(file_stat.st_mode):
            # FIFOs and devices would block or never end; linked directories are not
            # followed (loops, and files outside the model).
            findings.append(
                Finding(
                    severity=Severity.INFO,
                    file=relative,
                    code="file.skipped",
                    detail="not a regular file: not scanned",
                )
            )
            continue
        findings.extend(scan_file(full, name=relative, limits=limits))
        files_scanned += 1
        bytes_scanned += file_stat.st_size
    if merge_modelscan:
        from control_plane.models.scanner.modelscan_merge import modelscan_findings

        findings.extend(modelscan_findings(path))
    return ScanReport(
        scanner=SCANNER_NAME,
        version=SCANNER_VERSION,
        verdict=verdict_for(findings),
        findings=findings,
        files_scanned=files_scanned,
        bytes_scanned=bytes_scanned,
    )
