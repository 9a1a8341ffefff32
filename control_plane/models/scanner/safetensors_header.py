"""safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes.

The format cannot run code; what can go wrong is a header that points outside the file
or at overlapping bytes (loaders that trust it read out of bounds or alias tensors), or
bytes no tensor covers (room to smuggle a payload past a reviewer). Only the header is
read, whatever the file size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from control_plane.models.scanner._io import (
    ModelFormatError,
    Problems,
    Reader,
    Truncated,
    read_exact,
)
from workflows.contracts.models import Finding, Severity

DEFAULT_MAX_HEADER = 100_000_000
# Bits per element; sub-byte types (F4, F6) pack elements across bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    # [begin, end) relative to the start of the data section (8 + header length).
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(slots=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    header_length: int = 0
    # (severity, code, detail); a fatal one leaves `tensors` empty.
    problems: list[tuple[Severity, str, str]] = field(default_factory=list)
    fatal: bool = False

    @property
    def data_offset(self) -> int:
        return 8 + self.header_length


class _Problems(Problems):
    def __init__(self, header: SafetensorsHeader) -> None:
        super().__init__()
        self._header = header
        self.items = header.problems

    def fatal(self, severity: Severity, code: str, detail: str) -> SafetensorsHeader:
        self.add(severity, code, detail)
        self._header.fatal = True
        self._header.tensors = {}
        return self._header


def _pairs(duplicates: list[str]) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                duplicates.append(key)
            result[key] = value
        return result

    return hook


def _int_list(value: object) -> list[int] | None:
    if not isinstance(value, list) or not all(type(x) is int and x >= 0 for x in value):
        return None
    return value


def parse_safetensors_header(
    reader: Reader, size: int, *, max_header: int = DEFAULT_MAX_HEADER
) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file the reader starts at;
    problems are recorded, never raised (I/O errors aside)."""
    header = SafetensorsHeader()
    problems = _Problems(header)
    try:
        prefix = read_exact(reader, 8) if size >= 8 else b""
    except Truncated:
        prefix = b""
    if len(prefix) < 8:
        return problems.fatal(
            Severity.MEDIUM, "safetensors.truncated", "shorter than the 8-byte header length"
        )
    (length,) = struct.unpack("<Q", prefix)
    header.header_length = length
    if length > max_header:
        return problems.fatal(
            Severity.HIGH,
            "safetensors.header_too_large",
            f"header length {length} exceeds {max_header} bytes",
        )
    if length > size - 8:
        return problems.fatal(
            Severity.HIGH,
            "safetensors.out_of_bounds",
            f"header length {length} runs past the end of the file ({size} bytes)",
        )
    try:
        raw = read_exact(reader, length)
    except Truncated:
        return problems.fatal(
            Severity.MEDIUM, "safetensors.truncated", "the file ends inside the header"
        )
    duplicates: list[str] = []
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs(duplicates))
    except UnicodeDecodeError:
        return problems.fatal(
            Severity.MEDIUM, "safetensors.header_invalid", "the header is not UTF-8"
        )
    except (ValueError, RecursionError) as err:
        return problems.fatal(
            Severity.MEDIUM, "safetensors.header_invalid", f"the header is not JSON: {err}"
        )
    if not isinstance(parsed, dict):
        return problems.fatal(
            Severity.MEDIUM, "safetensors.header_invalid", "the header is not a JSON object"
        )
    for key in sorted(set(duplicates)):
        problems.add(Severity.MEDIUM, "safetensors.duplicate_key", f"key {key!r} repeats")

    data_length = size - 8 - length
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in parsed.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                problems.add(
                    Severity.MEDIUM,
                    "safetensors.metadata_invalid",
                    "__metadata__ must map strings to strings",
                )
            else:
                header.metadata = dict(entry)
            continue
        tensor, span = _check_entry(name, entry, data_length, problems)
        if tensor is not None:
            header.tensors[name] = tensor
        if span is not None:
            spans[name] = span
    _check_layout(spans, data_length, problems)
    return header


def _check_entry(
    name: str, entry: object, data_length: int, problems: _Problems
) -> tuple[TensorEntry | None, tuple[int, int] | None]:
    """The entry if valid, and its byte span if that is valid (for the layout check)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        problems.add(
            Severity.MEDIUM,
            "safetensors.entry_invalid",
            f"{name!r} needs exactly dtype, shape and data_offsets",
        )
        return None, None
    dtype = entry["dtype"]
    shape = _int_list(entry["shape"])
    offsets = _int_list(entry["data_offsets"])
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        problems.add(Severity.MEDIUM, "safetensors.dtype_unknown", f"{name!r}: dtype {dtype!r}")
    if shape is None:
        problems.add(Severity.MEDIUM, "safetensors.shape_invalid", f"{name!r}: {entry['shape']!r}")
    if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
        problems.add(
            Severity.MEDIUM,
            "safetensors.offsets_invalid",
            f"{name!r}: data_offsets {entry['data_offsets']!r}",
        )
        return None, None
    begin, end = offsets
    if end > data_length:
        problems.add(
            Severity.HIGH,
            "safetensors.out_of_bounds",
            f"{name!r}: bytes [{begin}, {end}) past the data section ({data_length} bytes)",
        )
        return None, None
    if bits is not None and shape is not None and math.prod(shape) * bits != (end - begin) * 8:
        problems.add(
            Severity.MEDIUM,
            "safetensors.size_mismatch",
            f"{name!r}: {dtype} {shape} needs {math.prod(shape) * bits / 8:g} bytes,"
            f" has {end - begin}",
        )
    if bits is None or shape is None:
        return None, (begin, end)
    entry_value = TensorEntry(dtype=str(dtype), shape=tuple(shape), data_offsets=(begin, end))
    return entry_value, (begin, end)


def _check_layout(
    spans_by_name: dict[str, tuple[int, int]], data_length: int, problems: _Problems
) -> None:
    # Empty tensors take no bytes: they can sit anywhere.
    spans = sorted((span, name) for name, span in spans_by_name.items() if span[1] > span[0])
    covered = 0
    previous = ""
    for (begin, end), name in spans:
        if begin < covered:
            problems.add(
                Severity.HIGH,
                "safetensors.overlap",
                f"{name!r} [{begin}, {end}) overlaps {previous!r} (ends at {covered})",
            )
        elif begin > covered:
            problems.add(
                Severity.MEDIUM,
                "safetensors.gap",
                f"bytes [{covered}, {begin}) of the data section belong to no tensor",
            )
        if end > covered:
            covered, previous = end, name
    if covered < data_length:
        problems.add(
            Severity.MEDIUM,
            "safetensors.trailing_data",
            f"{data_length - covered} bytes after the last tensor belong to no tensor",
        )


def read_safetensors_header(
    reader: Reader, size: int | None = None, *, max_header: int = DEFAULT_MAX_HEADER
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors (name -> dtype, shape, offsets) and `__metadata__` of a safetensors
    file, reading the header only. Raises `ModelFormatError` when the header cannot be
    parsed; entries that fail validation are left out (the scanner reports them)."""
    if size is None:
        start = reader.tell()
        size = reader.seek(0, 2) - start
        reader.seek(start)
    header = parse_safetensors_header(reader, size, max_header=max_header)
    if header.fatal:
        raise ModelFormatError("; ".join(detail for _, _, detail in header.problems))
    return header.tensors, header.metadata


def check_safetensors(
    reader: Reader, name: str, size: int, *, max_header: int = DEFAULT_MAX_HEADER
) -> tuple[list[Finding], bool]:
    """Findings for a safetensors file, and whether its header parsed at all."""
    header = parse_safetensors_header(reader, size, max_header=max_header)
    problems = Problems()
    problems.items = header.problems
    return problems.findings(name), not header.fatal
