"""Bounded, chunked reading shared by the format parsers."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

from workflows.contracts.models import Finding, Severity

CHUNK = 1 << 16


class Reader(Protocol):
    """What the scanner needs from a file: a local file, a spooled temp file, a zip
    member or any seekable stream over an object."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class ModelFormatError(ValueError):
    """A header that cannot be parsed at all (the public header readers raise it)."""


class Truncated(Exception):
    """The data ended before the structure did."""


class BudgetExceeded(Exception):
    """More decompressed bytes than `ScanLimits.max_decompressed_bytes` allow."""


@dataclass(frozen=True, slots=True)
class ScanLimits:
    # Bytes read out of archive members (decompressed), over the whole scan of one file.
    max_decompressed_bytes: int = 8 << 30
    # Archives inside archives (a torch zip inside a zip is depth 2).
    max_archive_depth: int = 3
    max_archive_members: int = 100_000
    # A member declaring more than this ratio of decompressed to compressed bytes (and
    # more than `bomb_min_bytes`) is treated as a zip bomb and not read.
    bomb_ratio: int = 200
    bomb_min_bytes: int = 64 << 20
    # Pickle bytes inside a pickle are scanned when at most this big.
    max_nested_pickle_bytes: int = 64 << 20
    max_pickle_depth: int = 3
    # Stack + memo entries a pickle walk keeps; a legit state dict needs a few thousand.
    max_pickle_entries: int = 20_000_000
    # Consecutive pickles in one stream (legacy `torch.save` writes five).
    max_pickles_per_stream: int = 8
    max_safetensors_header: int = 100_000_000
    max_npy_header: int = 1 << 20


class Budget:
    """Decompressed bytes left for the archive members of one scanned file."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise BudgetExceeded


class MeteredReader:
    """A reader that charges what is read (or skipped) to a `Budget`; zip members go
    through it so that a bomb stops at the budget instead of filling memory or disk."""

    def __init__(self, inner: Reader, budget: Budget) -> None:
        self._inner = inner
        self._budget = budget
        self._pos = 0

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            # Read to the end in chunks: the budget stops a bomb before memory does.
            parts = []
            while chunk := self.read(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        data = self._inner.read(size)
        self._budget.take(len(data))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        target = self._inner.seek(offset, whence)
        # Seeking forward in a compressed member decompresses what it skips.
        if target > self._pos:
            self._budget.take(target - self._pos)
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos


class Cursor:
    """Sequential reads over a reader through a buffer, for parsers that take many small
    fields (pickle opcodes, GGUF key/values). Offsets are relative to where it started;
    `limit` is how many bytes may follow (the reader may still end earlier)."""

    __slots__ = ("_reader", "_buf", "_pos", "_base", "_limit")

    def __init__(self, reader: Reader, limit: int) -> None:
        self._reader = reader
        self._buf = b""
        self._pos = 0
        self._base = 0
        self._limit = limit

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def remaining(self) -> int:
        return self._limit - self.offset

    def _fill(self, need: int) -> bool:
        """Make `need` bytes available from `_pos` if the data has them."""
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._base += self._pos
            self._pos = 0
        want = min(need, self._limit - self._base)
        parts = [self._buf]
        have = len(self._buf)
        room = self._limit - self._base
        while have < want:
            data = self._reader.read(min(max(CHUNK, want - have), room - have))
            if not data:
                break
            parts.append(data)
            have += len(data)
        if len(parts) > 1:
            self._buf = b"".join(parts)
        return have >= need

    def read(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._buf):
            if count < 0 or not self._fill(count):
                raise Truncated
            end = count
        data = self._buf[self._pos : end]
        self._pos = end
        return data

    def byte(self) -> int:
        if self._pos >= len(self._buf) and not self._fill(1):
            raise Truncated
        value = self._buf[self._pos]
        self._pos += 1
        return value

    def peek(self, count: int) -> bytes:
        """Up to `count` bytes without consuming them (fewer at the end of the data)."""
        if self._pos + count > len(self._buf):
            self._fill(count)
        return self._buf[self._pos : self._pos + count]

    def readline(self, keep: int) -> bytes | None:
        """The bytes up to a newline (excluded), consumed with it; None when the line is
        longer than `keep` (still consumed, so that parsing can go on)."""
        dropped = 0
        while True:
            newline = self._buf.find(b"\n", self._pos)
            if newline >= 0:
                length = dropped + newline - self._pos
                line = self._buf[self._pos : newline]
                self._pos = newline + 1
                return line if length <= keep else None
            pending = len(self._buf) - self._pos
            if dropped or pending > keep:
                # Too long to keep: let it stream past instead of buffering it whole.
                dropped += pending
                self._base += len(self._buf)
                self._buf = b""
                self._pos = 0
                pending = 0
            self._fill(pending + CHUNK)
            if len(self._buf) - self._pos == pending:
                raise Truncated

    def skip(self, count: int) -> None:
        if count < 0:
            raise Truncated
        available = len(self._buf) - self._pos
        if count <= available:
            self._pos += count
            return
        if self.offset + count > self._limit:
            raise Truncated
        rest = count - available
        self._base += len(self._buf)
        self._buf = b""
        self._pos = 0
        if rest > 4 * CHUNK:
            position = self._reader.tell()
            self._reader.seek(position + rest)
        else:
            while rest:
                data = self._reader.read(min(rest, CHUNK))
                if not data:
                    raise Truncated
                rest -= len(data)
        self._base += count - available


def read_exact(reader: Reader, count: int) -> bytes:
    """Exactly `count` bytes (reads in chunks: a pipe or zip member may return fewer)."""
    parts: list[bytes] = []
    have = 0
    while have < count:
        data = reader.read(min(count - have, 1 << 24))
        if not data:
            raise Truncated
        parts.append(data)
        have += len(data)
    return b"".join(parts)


def stream_size(reader: Reader) -> int:
    position = reader.tell()
    end = reader.seek(0, io.SEEK_END)
    reader.seek(position)
    return end


class Problems:
    """Problems found in one file, with a cap per kind: a crafted header can repeat the
    same defect a million times."""

    MAX_PER_CODE = 20

    def __init__(self) -> None:
        self.items: list[tuple[Severity, str, str]] = []
        self._counts: dict[str, int] = {}

    def add(self, severity: Severity, code: str, detail: str) -> None:
        count = self._counts.get(code, 0) + 1
        self._counts[code] = count
        if count <= self.MAX_PER_CODE:
            self.items.append((severity, code, detail))
        elif count == self.MAX_PER_CODE + 1:
            self.items.append((severity, code, "more of the same (not listed)"))

    def findings(self, name: str) -> list[Finding]:
        return [
            Finding(severity=severity, file=name, code=code, detail=detail)
            for severity, code, detail in self.items
        ]
