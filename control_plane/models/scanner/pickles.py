"""Pickle analysis by walking opcodes, never by loading.

The walk mirrors CPython's unpickler closely enough to know what each import and call
would be: a small abstract stack (with the mark stack and the memo) holds the strings,
globals, bytes and tuples the opcodes push, so that `STACK_GLOBAL` resolves its
operands even when they come through memo tricks (`BINPUT` ... `BINGET`), through
`DUP`, or from protocol 0/1 string opcodes. Everything else is an opaque value.

Findings: every import is classified by `policy.classify_global` when it happens (an
import alone runs module code); calls whose callable is not an imported global (the
result of `getattr(...)`, a persistent id...), writes into imported globals (`BUILD`,
`SETITEM`... on a class or module), copyreg extension codes, and pickles embedded as
bytes and handed to a non-allowlisted callable (scanned in turn) are flagged too.
"""

from __future__ import annotations

import _codecs
import io
import struct
from dataclasses import dataclass, field

from control_plane.models.scanner._io import Cursor, Reader, ScanLimits, Truncated
from control_plane.models.scanner.policy import LOADERS, classify_global
from workflows.contracts.models import Finding, Severity

# Strings longer than this are not kept: no module or attribute path is that long.
_MAX_TEXT = 64 * 1024
# Bytes values kept whole (to scan them if they turn out to be a pickle given to a call).
_MAX_KEPT_BYTES = 1 << 20
_MAX_LINE = 64 * 1024
_CHECK_EVERY = 1 << 16


def looks_like_pickle_header(head: bytes) -> bool:
    """`PROTO 2..5`, how every pickle since Python 2.3's protocol 2 starts."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


class _Malformed(Exception):
    pass


class _Limit(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Global:
    module: str
    name: str
    allowed: bool

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True, slots=True)
class _Bytes:
    # None when too large to keep; `head` still tells whether it looks like a pickle.
    data: bytes | None
    head: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class _Call:
    func: object


class _Opaque:
    """A value whose content is unknown (persistent ids, extension objects)."""

    __slots__ = ()


class _Scalar:
    """A value that is known not to be a string or a callable (numbers, containers)."""

    __slots__ = ()


class _LongText:
    """A string too long to keep."""

    __slots__ = ()


_OPAQUE = _Opaque()
_SCALAR = _Scalar()
_LONG_TEXT = _LongText()


@dataclass(slots=True)
class PickleScan:
    findings: list[Finding] = field(default_factory=list)
    # The first pickle of the stream parsed up to its STOP.
    complete: bool = False
    error: str | None = None
    imports: int = 0
    pickles: int = 0


class _Walker:
    def __init__(self, name: str, limits: ScanLimits, depth: int, prefix: str) -> None:
        self.name = name
        self.limits = limits
        self.depth = depth
        self.prefix = prefix
        self.result = PickleScan()
        self._seen: set[tuple[str, str]] = set()

    def report(self, severity: Severity, code: str, detail: str) -> None:
        if (code, detail) in self._seen:
            return
        self._seen.add((code, detail))
        self.result.findings.append(
            Finding(severity=severity, file=self.name, code=code, detail=self.prefix + detail)
        )

    def import_global(self, module: str, name: str) -> _Global:
        self.result.imports += 1
        verdict = classify_global(module, name)
        if verdict.severity is not None:
            self.report(verdict.severity, verdict.code, verdict.reason)
        return _Global(module, name, verdict.severity is None)

    def check_call(self, func: object, args: object, opname: str) -> None:
        if isinstance(func, _Global):
            if not func.allowed:
                self._nested(func, args)
            return
        if isinstance(func, (_Call, _Opaque)):
            self.report(
                Severity.HIGH,
                "pickle.call.dynamic",
                f"{opname} calls an object built while loading, not an imported global",
            )

    def mutate(self, target: object, opname: str) -> None:
        if isinstance(target, _Global):
            self.report(
                Severity.HIGH,
                "pickle.global.mutated",
                f"{opname} writes into the imported global {target.dotted}",
            )

    def _nested(self, func: _Global, args: object, level: int = 0) -> None:
        """Scan pickles passed (as bytes) to a callable that is not allowlisted."""
        if isinstance(args, tuple) and level < 4:
            for item in args:
                self._nested(func, item, level + 1)
            return
        if not isinstance(args, _Bytes):
            return
        loader = func.dotted in LOADERS
        # Protocol 0/1 pickles have no header: only bytes handed to a loader are read as
        # one when they start like one (an import, a mark, an empty container, a string).
        if not looks_like_pickle_header(args.head) and not (
            loader and args.head[:1] in (b"c", b"(", b"}", b"]", b"S", b"V")
        ):
            return
        loader = loader or classify_global(func.module, func.name).severity is Severity.CRITICAL
        severity = Severity.CRITICAL if loader else Severity.HIGH
        at = f"offset {args.offset}" if args.offset >= 0 else "built by _codecs.encode"
        where = f"{args.length} bytes, {at}"
        if args.data is None or self.depth >= self.limits.max_pickle_depth:
            self.report(
                severity,
                "pickle.nested",
                f"a pickle ({where}) is passed to {func.dotted}; too large or deep to scan",
            )
            return
        self.report(severity, "pickle.nested", f"a pickle ({where}) is passed to {func.dotted}")
        inner = scan_pickle(
            io.BytesIO(args.data),
            self.name,
            size=len(args.data),
            limits=self.limits,
            depth=self.depth + 1,
            prefix=f"{self.prefix}nested pickle ({at}): ",
        )
        for finding in inner.findings:
            self.report(finding.severity, finding.code, finding.detail[len(self.prefix) :])
        if not inner.complete:
            self.report(
                Severity.MEDIUM,
                "pickle.malformed",
                f"nested pickle ({at}): {inner.error}",
            )

    def walk(self, cursor: Cursor) -> None:
        stack: list[object] = []
        metastack: list[list[object]] = []
        memo: dict[int, object] = {}
        limits = self.limits
        ops = 0
        read = cursor.read
        byte = cursor.byte

        def pop_mark() -> list[object]:
            nonlocal stack
            if not metastack:
                raise _Malformed("MARK expected")
            items = stack
            stack = metastack.pop()
            return items

        def pop() -> object:
            if not stack:
                raise _Malformed("stack underflow")
            return stack.pop()

        def top() -> object:
            if not stack:
                raise _Malformed("stack underflow")
            return stack[-1]

        def line() -> bytes:
            value = cursor.readline(_MAX_LINE)
            if value is None:
                raise _Malformed("line too long")
            return value

        def text(length: int, decode: str) -> object:
            offset = cursor.offset
            if length > _MAX_TEXT:
                cursor.skip(length)
                return _LONG_TEXT
            raw = read(length)
            try:
                return raw.decode(decode, "surrogatepass")
            except UnicodeDecodeError as err:
                raise _Malformed(f"undecodable string at offset {offset}") from err

        def binary(length: int) -> _Bytes:
            offset = cursor.offset
            if length <= _MAX_KEPT_BYTES:
                data = read(length)
                return _Bytes(data, data[:16], offset, length)
            head = cursor.peek(16)
            cursor.skip(length)
            return _Bytes(None, head, offset, length)

        def memo_put(index: int) -> None:
            if index < 0:
                raise _Malformed("negative memo index")
            memo[index] = top()

        def memo_get(index: int) -> None:
            try:
                stack.append(memo[index])
            except KeyError as err:
                raise _Malformed(f"memo key {index} missing") from err

        def uint(size: int) -> int:
            return int.from_bytes(read(size), "little")

        while True:
            ops += 1
            if ops % _CHECK_EVERY == 0 and (
                len(stack) + len(memo) + len(metastack) > limits.max_pickle_entries
            ):
                raise _Limit("more stack and memo entries than the scan allows")
            op = byte()
            # What state dicts are made of comes first: this chain is the hot loop.
            if op == 0x4B:  # BININT1
                byte()
                stack.append(_SCALAR)
            elif op == 0x71:  # BINPUT
                memo_put(byte())
            elif op == 0x68:  # BINGET
                memo_get(byte())
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
            elif op == 0x74:  # TUPLE
                items = pop_mark()  # rebinds `stack`: pop before appending
                stack.append(tuple(items))
            elif op == 0x58:  # BINUNICODE
                stack.append(text(uint(4), "utf-8"))
            elif op == 0x8C:  # SHORT_BINUNICODE
                stack.append(text(byte(), "utf-8"))
            elif op == 0x94:  # MEMOIZE
                memo_put(len(memo))
            elif op == 0x52:  # REDUCE
                args = pop()
                func = pop()
                self.check_call(func, args, "REDUCE")
                stack.append(_reduce_value(func, args))
            elif op in (0x4E, 0x88, 0x89):  # NONE, NEWTRUE, NEWFALSE
                stack.append(_SCALAR)
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x85:  # TUPLE1
                stack.append((pop(),))
            elif op == 0x86:  # TUPLE2
                second = pop()
                stack.append((pop(), second))
            elif op == 0x87:  # TUPLE3
                third = pop()
                second = pop()
                stack.append((pop(), second, third))
            elif op == 0x51:  # BINPERSID
                pop()
                stack.append(_OPAQUE)
            elif op == 0x80:  # PROTO
                if byte() > 5:
                    raise _Malformed("unsupported protocol")
            elif op == 0x95:  # FRAME: a read-ahead hint, the opcodes follow as usual.
                read(8)
            elif op == 0x2E:  # STOP
                return
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                stack.append(top())
            # Strings: kept, they may become STACK_GLOBAL operands.
            elif op == 0x8D:  # BINUNICODE8
                stack.append(text(uint(8), "utf-8"))
            elif op == 0x56:  # UNICODE
                raw_line = cursor.readline(_MAX_TEXT)
                try:
                    stack.append(
                        _LONG_TEXT if raw_line is None else raw_line.decode("raw-unicode-escape")
                    )
                except UnicodeDecodeError as err:
                    raise _Malformed("undecodable UNICODE") from err
            # Protocol 0-2 byte strings load as `str` by default (encoding="ASCII"); read
            # them as latin-1, which accepts what any encoding a loader picks would.
            elif op == 0x55:  # SHORT_BINSTRING
                stack.append(text(byte(), "latin-1"))
            elif op == 0x54:  # BINSTRING
                length = int.from_bytes(read(4), "little", signed=True)
                if length < 0:
                    raise _Malformed("negative BINSTRING length")
                stack.append(text(length, "latin-1"))
            elif op == 0x53:  # STRING
                raw_line = cursor.readline(_MAX_TEXT)
                if raw_line is None:
                    stack.append(_LONG_TEXT)
                    continue
                raw = raw_line
                if len(raw) < 2 or raw[0] != raw[-1] or raw[0] not in b"\"'":
                    raise _Malformed("STRING not quoted")
                try:
                    stack.append(_codecs.escape_decode(raw[1:-1])[0].decode("latin-1"))
                except ValueError as err:
                    raise _Malformed("bad STRING escape") from err
            elif op == 0x43:  # SHORT_BINBYTES
                stack.append(binary(byte()))
            elif op == 0x42:  # BINBYTES
                stack.append(binary(uint(4)))
            elif op in (0x8E, 0x96):  # BINBYTES8, BYTEARRAY8
                stack.append(binary(uint(8)))
            # Numbers and constants.
            elif op == 0x4D:  # BININT2
                read(2)
                stack.append(_SCALAR)
            elif op == 0x4A:  # BININT
                read(4)
                stack.append(_SCALAR)
            elif op == 0x47:  # BINFLOAT
                read(8)
                stack.append(_SCALAR)
            elif op in (0x49, 0x4C, 0x46):  # INT, LONG, FLOAT (any length: big ints)
                cursor.readline(0)
                stack.append(_SCALAR)
            elif op == 0x8A:  # LONG1
                cursor.skip(byte())
                stack.append(_SCALAR)
            elif op == 0x8B:  # LONG4
                length = int.from_bytes(read(4), "little", signed=True)
                if length < 0:
                    raise _Malformed("negative LONG4 length")
                cursor.skip(length)
                stack.append(_SCALAR)
            # Containers.
            elif op in (0x5D, 0x7D, 0x8F):  # EMPTY_LIST, EMPTY_DICT, EMPTY_SET
                stack.append(_SCALAR)
            elif op in (0x6C, 0x64, 0x91):  # LIST, DICT, FROZENSET
                pop_mark()
                stack.append(_SCALAR)
            elif op == 0x61:  # APPEND
                pop()
                self.mutate(top(), "APPEND")
            elif op in (0x65, 0x90):  # APPENDS, ADDITEMS
                pop_mark()
                self.mutate(top(), "APPENDS" if op == 0x65 else "ADDITEMS")
            elif op == 0x73:  # SETITEM
                pop()
                pop()
                self.mutate(top(), "SETITEM")
            elif op == 0x75:  # SETITEMS
                pop_mark()
                self.mutate(top(), "SETITEMS")
            # Memo.
            elif op == 0x72:  # LONG_BINPUT
                memo_put(uint(4))
            elif op == 0x70:  # PUT
                try:
                    memo_put(int(line()))
                except ValueError as err:
                    raise _Malformed("bad PUT index") from err
            elif op == 0x6A:  # LONG_BINGET
                memo_get(uint(4))
            elif op == 0x67:  # GET
                try:
                    memo_get(int(line()))
                except ValueError as err:
                    raise _Malformed("bad GET index") from err
            # Imports.
            elif op == 0x63:  # GLOBAL
                try:
                    module = line().decode("utf-8")
                    name = line().decode("utf-8")
                except UnicodeDecodeError as err:
                    raise _Malformed("undecodable GLOBAL") from err
                stack.append(self.import_global(module, name))
            elif op == 0x93:  # STACK_GLOBAL
                name_value = pop()
                module_value = pop()
                if isinstance(module_value, str) and isinstance(name_value, str):
                    stack.append(self.import_global(module_value, name_value))
                elif any(
                    isinstance(value, (_Scalar, _Bytes, tuple))
                    for value in (module_value, name_value)
                ):
                    raise _Malformed("STACK_GLOBAL operands are not strings")
                else:
                    self.result.imports += 1
                    self.report(
                        Severity.HIGH,
                        "pickle.global.dynamic",
                        "STACK_GLOBAL imports a name computed while loading",
                    )
                    stack.append(_Global("?", "?", False))
            elif op == 0x69:  # INST
                try:
                    module = line().decode("ascii")
                    name = line().decode("ascii")
                except UnicodeDecodeError as err:
                    raise _Malformed("undecodable INST") from err
                cls = self.import_global(module, name)
                self.check_call(cls, tuple(pop_mark()), "INST")
                stack.append(_Call(cls))
            elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
                read({0x82: 1, 0x83: 2, 0x84: 4}[op])
                self.result.imports += 1
                self.report(
                    Severity.HIGH,
                    "pickle.extension",
                    "imports a global through the copyreg extension registry",
                )
                stack.append(_OPAQUE)
            # Calls.
            elif op == 0x81:  # NEWOBJ
                args = pop()
                cls_value = pop()
                self.check_call(cls_value, args, "NEWOBJ")
                stack.append(_Call(cls_value))
            elif op == 0x92:  # NEWOBJ_EX
                pop()
                args = pop()
                cls_value = pop()
                self.check_call(cls_value, args, "NEWOBJ_EX")
                stack.append(_Call(cls_value))
            elif op == 0x6F:  # OBJ
                items = pop_mark()
                if not items:
                    raise _Malformed("OBJ without a class")
                self.check_call(items[0], tuple(items[1:]), "OBJ")
                stack.append(_Call(items[0]))
            elif op == 0x62:  # BUILD
                pop()
                self.mutate(top(), "BUILD")
            elif op == 0x50:  # PERSID
                line()
                stack.append(_OPAQUE)
            elif op == 0x97:  # NEXT_BUFFER
                stack.append(_OPAQUE)
            elif op == 0x98:  # READONLY_BUFFER
                top()
            else:
                raise _Malformed(f"unknown opcode 0x{op:02x} at offset {cursor.offset - 1}")


def _reduce_value(func: object, args: object) -> object:
    # `_codecs.encode(text, "latin1")` is how protocol 2 writes bytes: keep them as bytes
    # so that a pickle hidden in them is still seen when handed to a loader.
    if (
        isinstance(func, _Global)
        and func.module == "_codecs"
        and func.name == "encode"
        and isinstance(args, tuple)
        and args
        and isinstance(args[0], str)
    ):
        try:
            data = args[0].encode("latin-1")
        except UnicodeEncodeError:
            return _Call(func)
        return _Bytes(data, data[:16], -1, len(data))
    return _Call(func)


def scan_pickle(
    reader: Reader,
    name: str,
    *,
    size: int,
    limits: ScanLimits | None = None,
    depth: int = 0,
    prefix: str = "",
    findings: list[Finding] | None = None,
) -> PickleScan:
    """Walk the pickle(s) that start at the reader's position (`size` bytes at most).

    Consecutive pickles are walked too (legacy `torch.save` writes five, then raw
    storage bytes): a following pickle is walked when it starts with a protocol 2+
    header, and its own truncation is not reported (it may be storage bytes that happen
    to look like a header)."""
    limits = limits or ScanLimits()
    walker = _Walker(name, limits, depth, prefix)
    cursor = Cursor(reader, size)
    result = walker.result
    if findings is not None:
        # Findings land in the caller's list as they are found: a read error from the
        # underlying reader (a corrupt zip member) then loses none of them.
        result.findings = findings
    for index in range(limits.max_pickles_per_stream):
        try:
            walker.walk(cursor)
        except (_Malformed, Truncated, struct.error) as err:
            if index == 0:
                result.error = str(err) or "truncated"
            break
        except _Limit as err:
            walker.report(Severity.MEDIUM, "pickle.limit", str(err))
            if index == 0:
                result.error = str(err)
            break
        result.pickles += 1
        if index == 0:
            result.complete = True
        if not looks_like_pickle_header(cursor.peek(2)):
            break
    return result
