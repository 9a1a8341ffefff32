"""GGUF (llama.cpp): magic, version, key/value metadata, tensor infos, aligned data.

Like safetensors the format carries no code (chat templates are Jinja text that the
serving runtime renders in a sandbox); the risks are lengths and offsets that point past
the file, which native parsers have turned into memory corruption. Only the header is
read: the tensor data is checked against the file size, never loaded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from control_plane.models.scanner._io import Cursor, ModelFormatError, Problems, Reader, Truncated
from workflows.contracts.models import Finding, Severity

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Sane bounds: the largest published models have a few thousand tensors and a few dozen
# keys (plus the tokenizer arrays, which are one key each).
MAX_TENSORS = 1_000_000
MAX_KEYS = 100_000
MAX_DIMS = 4
# Tensor names longer than this are refused by llama.cpp (GGML_MAX_NAME, with the NUL).
MAX_TENSOR_NAME = 63
# Arrays up to this many items are returned whole; longer ones (token lists) summarised.
MAX_ARRAY_VALUES = 64
_MAX_ARRAY_DEPTH = 2

# GGUF value types: struct format of the fixed-size ones.
_FIXED: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING = 8
_ARRAY = 9

# GGML tensor types: name, elements per block, bytes per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

GGUFScalar = int | float | bool | str


@dataclass(frozen=True, slots=True)
class GGUFArray:
    """An array too long to return whole (token lists): its item type and length."""

    item_type: int
    count: int


GGUFValue = GGUFScalar | list[GGUFScalar] | GGUFArray


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    # GGML order: the fastest-varying dimension first.
    shape: tuple[int, ...]
    ggml_type: int
    # `Q4_K`, `F16`...; None for a type this scanner does not know.
    type_name: str | None
    # Relative to the start of the (aligned) data section.
    offset: int
    nbytes: int | None


@dataclass(slots=True)
class GGUFHeader:
    version: int = 0
    metadata: dict[str, GGUFValue] = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0
    problems: Problems = field(default_factory=Problems)
    fatal: bool = False


class _Fatal(Exception):
    def __init__(self, severity: Severity, code: str, detail: str) -> None:
        super().__init__(detail)
        self.severity = severity
        self.code = code


class _Parser:
    def __init__(self, cursor: Cursor, header: GGUFHeader) -> None:
        self.cursor = cursor
        self.header = header
        self.wide = True  # v2+: 64-bit lengths and counts

    def count(self) -> int:
        size = 8 if self.wide else 4
        return int.from_bytes(self.cursor.read(size), "little")

    def string(self, what: str, keep: bool = True) -> str | None:
        length = self.count()
        if length > self.cursor.remaining:
            raise _Fatal(
                Severity.HIGH,
                "gguf.out_of_bounds",
                f"{what}: a {length}-byte string runs past the end of the file",
            )
        if not keep:
            self.cursor.skip(length)
            return None
        raw = self.cursor.read(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.header.problems.add(Severity.MEDIUM, "gguf.bad_string", f"{what}: not UTF-8")
            return raw.decode("utf-8", "replace")

    def value(self, kind: int, what: str, depth: int = 0) -> GGUFValue:
        fmt = _FIXED.get(kind)
        if fmt is not None:
            result: GGUFScalar = struct.unpack(fmt, self.cursor.read(struct.calcsize(fmt)))[0]
            return result
        if kind == _STRING:
            return self.string(what) or ""
        if kind == _ARRAY and depth < _MAX_ARRAY_DEPTH:
            return self.array(what, depth)
        raise _Fatal(Severity.MEDIUM, "gguf.bad_type", f"{what}: value type {kind}")

    def array(self, what: str, depth: int) -> GGUFValue:
        item_type = int.from_bytes(self.cursor.read(4), "little")
        count = self.count()
        fmt = _FIXED.get(item_type)
        smallest = struct.calcsize(fmt) if fmt else (8 if self.wide else 4)
        if item_type not in _FIXED and item_type not in (_STRING, _ARRAY):
            raise _Fatal(Severity.MEDIUM, "gguf.bad_type", f"{what}: array of type {item_type}")
        if count * smallest > self.cursor.remaining:
            raise _Fatal(
                Severity.HIGH,
                "gguf.out_of_bounds",
                f"{what}: {count} items run past the end of the file",
            )
        if count <= MAX_ARRAY_VALUES:
            items = [self.value(item_type, what, depth + 1) for _ in range(count)]
            if all(isinstance(item, (int, float, str)) for item in items):
                return [item for item in items if isinstance(item, (int, float, str))]
            return GGUFArray(item_type, count)
        if fmt is not None:
            self.cursor.skip(count * smallest)
        elif item_type == _STRING:
            for _ in range(count):
                self.string(what, keep=False)
        else:
            for _ in range(count):
                self.value(item_type, what, depth + 1)
        return GGUFArray(item_type, count)

    def parse(self) -> None:
        cursor, header = self.cursor, self.header
        if cursor.read(4) != MAGIC:
            raise _Fatal(Severity.MEDIUM, "gguf.bad_magic", "does not start with GGUF")
        header.version = int.from_bytes(cursor.read(4), "little")
        if not 1 <= header.version <= 3:
            raise _Fatal(Severity.MEDIUM, "gguf.bad_version", f"version {header.version}")
        self.wide = header.version >= 2
        tensor_count = self.count()
        key_count = self.count()
        if tensor_count > MAX_TENSORS:
            raise _Fatal(Severity.HIGH, "gguf.bad_count", f"{tensor_count} tensors")
        if key_count > MAX_KEYS:
            raise _Fatal(Severity.HIGH, "gguf.bad_count", f"{key_count} metadata keys")
        # Each key takes at least 13 bytes and each tensor info 24.
        if tensor_count * 24 + key_count * 13 > cursor.remaining:
            raise Truncated
        for index in range(key_count):
            key = self.string(f"key #{index}") or ""
            kind = int.from_bytes(cursor.read(4), "little")
            if key in header.metadata:
                header.problems.add(Severity.MEDIUM, "gguf.duplicate_key", f"{key!r} repeats")
            header.metadata[key] = self.value(kind, key)
        alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0:
            header.alignment = alignment
        else:
            header.problems.add(
                Severity.MEDIUM, "gguf.bad_alignment", f"general.alignment {alignment!r}"
            )
        for _ in range(tensor_count):
            header.tensors.append(self.tensor_info())
        header.data_offset = -(-cursor.offset // header.alignment) * header.alignment

    def tensor_info(self) -> GGUFTensorInfo:
        problems = self.header.problems
        name = self.string("tensor name") or ""
        dims = int.from_bytes(self.cursor.read(4), "little")
        if dims > 64:
            raise _Fatal(Severity.HIGH, "gguf.bad_count", f"tensor {name!r}: {dims} dimensions")
        shape = tuple(int.from_bytes(self.cursor.read(8), "little") for _ in range(dims))
        ggml_type = int.from_bytes(self.cursor.read(4), "little")
        offset = int.from_bytes(self.cursor.read(8), "little")
        if len(name.encode()) > MAX_TENSOR_NAME:
            problems.add(Severity.MEDIUM, "gguf.tensor_invalid", f"tensor name too long: {name!r}")
        if dims > MAX_DIMS:
            problems.add(Severity.MEDIUM, "gguf.tensor_invalid", f"{name!r}: {dims} dimensions")
        if offset % self.header.alignment:
            problems.add(Severity.MEDIUM, "gguf.misaligned", f"{name!r}: offset {offset}")
        known = GGML_TYPES.get(ggml_type)
        nbytes = None
        if known is None:
            problems.add(Severity.MEDIUM, "gguf.type_unknown", f"{name!r}: GGML type {ggml_type}")
        else:
            _, block, block_bytes = known
            elements = 1
            for dim in shape:
                elements *= dim
            if shape and shape[0] % block:
                problems.add(
                    Severity.MEDIUM,
                    "gguf.tensor_invalid",
                    f"{name!r}: rows of {shape[0]} are not whole {known[0]} blocks",
                )
            nbytes = elements // block * block_bytes
        return GGUFTensorInfo(
            name=name,
            shape=shape,
            ggml_type=ggml_type,
            type_name=known[0] if known else None,
            offset=offset,
            nbytes=nbytes,
        )


def parse_gguf_header(reader: Reader, size: int) -> GGUFHeader:
    """Parse and validate the header of the GGUF file the reader starts at; problems are
    recorded, never raised (I/O errors aside)."""
    header = GGUFHeader()
    try:
        _Parser(Cursor(reader, size), header).parse()
    except _Fatal as fatal:
        header.problems.add(fatal.severity, fatal.code, str(fatal))
        header.fatal = True
        return header
    except Truncated:
        header.problems.add(Severity.MEDIUM, "gguf.truncated", "the file ends inside the header")
        header.fatal = True
        return header
    _check_data(header, size)
    return header


def _check_data(header: GGUFHeader, size: int) -> None:
    problems = header.problems
    names: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for tensor in header.tensors:
        if tensor.name in names:
            problems.add(Severity.MEDIUM, "gguf.duplicate_tensor", f"{tensor.name!r} repeats")
        names.add(tensor.name)
        if tensor.nbytes is None:
            continue
        begin = header.data_offset + tensor.offset
        end = begin + tensor.nbytes
        if end > size:
            problems.add(
                Severity.HIGH,
                "gguf.out_of_bounds",
                f"{tensor.name!r}: bytes [{begin}, {end}) past the end of the file ({size})",
            )
        elif tensor.nbytes:
            spans.append((begin, end, tensor.name))
    spans.sort()
    covered, previous = 0, ""
    for begin, end, name in spans:
        if begin < covered:
            problems.add(Severity.HIGH, "gguf.overlap", f"{name!r} overlaps {previous!r}")
        if end > covered:
            covered, previous = end, name


def read_gguf_header(
    reader: Reader, size: int | None = None
) -> tuple[dict[str, GGUFValue], list[GGUFTensorInfo]]:
    """The key/value metadata (arrays longer than `MAX_ARRAY_VALUES` summarised as
    `GGUFArray`) and the tensor infos of a GGUF file, without reading tensor data.
    Raises `ModelFormatError` when the header cannot be parsed."""
    if size is None:
        start = reader.tell()
        size = reader.seek(0, 2) - start
        reader.seek(start)
    header = parse_gguf_header(reader, size)
    if header.fatal:
        raise ModelFormatError("; ".join(detail for _, _, detail in header.problems.items))
    return header.metadata, header.tensors


def check_gguf(reader: Reader, name: str, size: int) -> tuple[list[Finding], bool]:
    """Findings for a GGUF file, and whether its header parsed at all."""
    header = parse_gguf_header(reader, size)
    return header.problems.findings(name), not header.fatal
