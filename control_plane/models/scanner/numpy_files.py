"""`.npy`: magic, version, a Python-literal header, then raw array bytes, or a pickle
when the dtype holds Python objects (`np.load(allow_pickle=True)` unpickles it)."""

from __future__ import annotations

import ast
import math
import re
import struct
from dataclasses import dataclass

from control_plane.models.scanner._io import Reader, read_exact
from workflows.contracts.models import Finding, Severity

MAGIC = b"\x93NUMPY"
_DESCR = re.compile(r"^[<>|=]?([a-zA-Z])(\d*)(\[[a-zA-Z0-9]+\])?$")
# Bytes per item for kinds that take no size (`?`) or count characters (`U`: UCS-4).
_KIND_SIZE = {"?": 1, "b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "l": 8, "L": 8, "q": 8}
_KIND_SIZE |= {"Q": 8, "e": 2, "f": 4, "d": 8, "g": 16, "F": 8, "D": 16, "G": 32}


@dataclass(slots=True)
class NpyHeader:
    descr: object
    shape: tuple[int, ...]
    # Bytes before the array data (magic + version + length + header).
    data_offset: int
    has_objects: bool
    # None for dtypes whose size this parser does not compute (structured ones).
    nbytes: int | None


class NpyError(Exception):
    pass


def _has_objects(descr: object, depth: int = 0) -> bool:
    if depth > 32:
        return True
    if isinstance(descr, str):
        match = _DESCR.match(descr)
        # Anything unparsable is treated as possibly holding objects: numpy would either
        # refuse it or might build an object dtype from it.
        return match is None or match.group(1) == "O"
    if isinstance(descr, (list, tuple)):
        return any(_has_objects(item, depth + 1) for item in descr)
    return True


def _itemsize(descr: object) -> int | None:
    if not isinstance(descr, str):
        return None
    match = _DESCR.match(descr)
    if match is None:
        return None
    kind, digits, _ = match.groups()
    if digits:
        count = int(digits)
        return count * 4 if kind == "U" else count
    return _KIND_SIZE.get(kind)


def read_npy_header(reader: Reader, max_header: int) -> NpyHeader:
    """The header of the `.npy` the reader starts at; raises `NpyError` (or `Truncated`
    when the file ends inside it)."""
    prefix = read_exact(reader, 8)
    if prefix[:6] != MAGIC:
        raise NpyError("no NUMPY magic")
    major = prefix[6]
    if major == 1:
        length = struct.unpack("<H", read_exact(reader, 2))[0]
        data_offset = 10 + length
    elif major in (2, 3):
        length = struct.unpack("<I", read_exact(reader, 4))[0]
        data_offset = 12 + length
    else:
        raise NpyError(f"unknown .npy version {major}")
    if length > max_header:
        raise NpyError(f"header of {length} bytes")
    raw = read_exact(reader, length)
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
        # A Python literal: `literal_eval` builds constants and containers only.
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as err:
        raise NpyError(f"header is not a Python literal: {err}") from err
    if not isinstance(parsed, dict) or set(parsed) != {"descr", "fortran_order", "shape"}:
        raise NpyError("header needs exactly descr, fortran_order and shape")
    shape = parsed["shape"]
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise NpyError(f"bad shape {shape!r}")
    if not isinstance(parsed["fortran_order"], bool):
        raise NpyError("bad fortran_order")
    descr = parsed["descr"]
    itemsize = _itemsize(descr)
    return NpyHeader(
        descr=descr,
        shape=shape,
        data_offset=data_offset,
        has_objects=_has_objects(descr),
        nbytes=None if itemsize is None else math.prod(shape) * itemsize,
    )


def check_npy_header(header: NpyHeader, name: str, size: int) -> list[Finding]:
    """Findings about the array bytes of a `.npy` without objects."""
    if header.nbytes is None:
        return []
    available = size - header.data_offset
    if available < header.nbytes:
        return [
            Finding(
                severity=Severity.MEDIUM,
                file=name,
                code="numpy.truncated",
                detail=f"{header.nbytes} bytes of array data expected, {available} present",
            )
        ]
    if available > header.nbytes:
        return [
            Finding(
                severity=Severity.MEDIUM,
                file=name,
                code="numpy.trailing_data",
                detail=f"{available - header.nbytes} bytes after the array data",
            )
        ]
    return []
