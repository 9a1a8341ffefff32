"""Object store: model files, datasets and benchmark results live here, not in PostgreSQL.

Two backends share one async API and one key syntax, so code written against the local
directory of `cpctl dev` runs unchanged against MinIO or any S3-compatible service:

- `FileObjectStore` keeps objects under a directory (`Settings.objects_dir`).
- `S3ObjectStore` talks S3 through the synchronous `minio` client, in threads.

Objects are streamed in both directions; no call holds a whole large object in memory.
Keys are `/`-separated relative paths; content-addressed keys come from `content_key`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import os
import queue
import re
import secrets
import stat as stat_module
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, ParamSpec, Self, TypeVar, cast

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Object as MinioObject
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from control_plane.core.config import Settings
from control_plane.core.errors import DependencyUnavailable

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "FileObjectStore",
    "HashingReader",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3ObjectStore",
    "content_key",
    "create_object_store",
    "sha256_file",
    "validate_key",
]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
MIN_PART_SIZE: Final = 5 * 1024 * 1024
MAX_PART_SIZE: Final = 5 * 1024 * 1024 * 1024
MAX_PARTS: Final = 10_000

# Size of the pieces `get_stream` yields and file copies move at once.
READ_CHUNK_BYTES: Final = 1024 * 1024
MAX_KEY_BYTES: Final = 1024
# A key segment becomes a file name in the file backend; most filesystems stop at 255.
MAX_SEGMENT_BYTES: Final = 255
# S3 caps user metadata at 2 KiB; the file backend enforces the same so both agree.
MAX_METADATA_BYTES: Final = 2048

_FORBIDDEN_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_METADATA_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_S3_USER_METADATA = "x-amz-meta-"
_S3_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_S3_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# Hashing a chunk this large costs more than the hop to a worker thread.
_HASH_IN_THREAD_BYTES = 64 * 1024
# Chunks waiting between the event loop and an S3 upload thread.
_UPLOAD_QUEUE_CHUNKS = 4


class ObjectNotFound(KeyError):
    """The key names no object."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"object {self.key!r} not found"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a store knows about one object.

    `etag` is opaque: an MD5 hex for the file backend and single-part S3 uploads, the
    S3 multipart form (`<hex>-<parts>`) otherwise. Entries yielded by `list` leave
    `content_type` as None and `metadata` empty on every backend; `stat` fills them.
    """

    key: str
    size: int
    etag: str
    last_modified: datetime
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- keys


def validate_key(key: str) -> str:
    """Return `key` if it is a valid object key, else raise ValueError saying why.

    Keys are relative `/`-separated paths: no leading `/`, no empty, `.` or `..`
    segments, no backslashes or control characters. Both backends apply the same
    rules, which also keeps every key inside the file backend's root.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"object key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must be relative, not start with '/'")
    if _FORBIDDEN_KEY_CHARS.search(key):
        raise ValueError(f"object key {key!r} contains a backslash or control character")
    for segment in key.split("/"):
        _check_segment(key, segment)
    return key


def _check_segment(key: str, segment: str, *, what: str = "object key") -> None:
    if not segment:
        raise ValueError(f"{what} {key!r} has an empty segment ('//' or a trailing '/')")
    if segment in (".", ".."):
        raise ValueError(f"{what} {key!r} must not contain '.' or '..' segments")
    if len(segment.encode()) > MAX_SEGMENT_BYTES:
        raise ValueError(f"{what} {key!r} has a segment longer than {MAX_SEGMENT_BYTES} bytes")


def _validate_prefix(prefix: str) -> str:
    # A prefix is a key cut anywhere: its last segment may be partial or empty.
    if not isinstance(prefix, str):
        raise ValueError("object key prefix must be a string")
    if not prefix:
        return prefix
    if prefix.startswith("/"):
        raise ValueError(f"object key prefix {prefix!r} must be relative, not start with '/'")
    if _FORBIDDEN_KEY_CHARS.search(prefix):
        raise ValueError(f"object key prefix {prefix!r} contains a backslash or control character")
    for segment in prefix.split("/")[:-1]:
        _check_segment(prefix, segment, what="object key prefix")
    return prefix


def content_key(sha256_hex: str, *, prefix: str = "blobs") -> str:
    """The content-addressed key of a blob: `<prefix>/sha256/ab/cd/abcd...`.

    Fanning out on the first two bytes keeps directories small in the file backend and
    spreads S3 key ranges.
    """
    if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
        raise ValueError("sha256_hex must be 64 lowercase hexadecimal characters")
    return validate_key(f"{prefix}/sha256/{sha256_hex[:2]}/{sha256_hex[2:4]}/{sha256_hex}")


def _normalize_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    # HTTP headers carry S3 metadata: names are case-insensitive (so we lowercase them)
    # and values must be printable ASCII without surrounding spaces to round-trip.
    normalized: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        lowered = name.lower() if isinstance(name, str) else name
        if not isinstance(lowered, str) or not _METADATA_NAME.fullmatch(lowered):
            raise ValueError(
                f"metadata name {name!r} must be letters, digits and '-', starting with "
                "a letter or digit"
            )
        if lowered in normalized:
            raise ValueError(f"metadata name {name!r} is repeated (names ignore case)")
        if not isinstance(value, str) or (value and not _HEADER_VALUE.fullmatch(value)):
            raise ValueError(
                f"metadata {name!r} must be printable ASCII without leading or trailing spaces"
            )
        normalized[lowered] = value
    if sum(len(name) + len(value) for name, value in normalized.items()) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    return normalized


def _normalize_content_type(content_type: str | None) -> str:
    if content_type is None:
        return DEFAULT_CONTENT_TYPE
    if not isinstance(content_type, str) or not _HEADER_VALUE.fullmatch(content_type):
        raise ValueError(f"content type {content_type!r} must be printable ASCII")
    return content_type


def _validate_range(offset: int, length: int | None) -> None:
    if offset < 0:
        raise ValueError("offset must be zero or positive")
    if length is not None and length < 0:
        raise ValueError("length must be zero or positive")


# ------------------------------------------------------------------------- hashing


class HashingReader:
    """Passes an async stream of chunks through while computing its SHA-256 and size.

    Wrap the stream given to `put_stream`, then read `sha256_hex` to learn the
    content address of what was stored:

        reader = HashingReader(response.aiter_bytes())
        await store.put_stream(staging_key, reader)
        final_key = content_key(reader.sha256_hex)
    """

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._chunks = chunks
        self._hash = hashlib.sha256()
        self._started = False
        self._complete = False
        self.size = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._started:
            raise RuntimeError("a HashingReader can only be read once")
        self._started = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            if len(chunk) >= _HASH_IN_THREAD_BYTES:
                # hashlib releases the GIL on large buffers; keep the loop responsive.
                await asyncio.to_thread(self._hash.update, chunk)
            else:
                self._hash.update(chunk)
            self.size += len(chunk)
            yield chunk
        self._complete = True

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def sha256_hex(self) -> str:
        # A digest of part of a stream would name the wrong content.
        if not self._complete:
            raise RuntimeError("the stream has not been read to the end")
        return self._hash.hexdigest()


async def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a local file, read in a worker thread."""

    def digest() -> str:
        hasher = hashlib.sha256()
        with open(path, "rb") as file:
            while block := file.read(READ_CHUNK_BYTES):
                hasher.update(block)
        return hasher.hexdigest()

    return await _run_in_own_thread(digest, name="sha256-file")


# ------------------------------------------------------------------------ threads


def _md5_file(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as reader:
        while block := reader.read(READ_CHUNK_BYTES):
            md5.update(block)
    return md5.hexdigest()


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(cast(T, result))


def _run_in_own_thread(fn: Callable[[], T], *, name: str) -> asyncio.Future[T]:
    """Run a long blocking call in a thread of its own.

    Whole-object uploads and copies block for minutes; running them in the default
    executor could starve it, and an upload that waits on chunks produced through
    `asyncio.to_thread` could then deadlock.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class _UploadAborted(Exception):
    """The producer of an upload stream failed or was cancelled."""


_EOF: Final = object()


class _UploadPipe(io.RawIOBase):
    """A read-only file that a blocking upload thread reads and the event loop feeds.

    At most `max_chunks` chunks wait in between, so memory stays bounded however fast
    the producer is; the producer runs in its caller's task.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_chunks: int) -> None:
        super().__init__()
        self._loop = loop
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(max_chunks)
        self._current = memoryview(b"")
        self._eof = False
        self._aborted = threading.Event()
        self.reader_gone = False

    # Event-loop side.

    async def feed(self, chunk: bytes) -> bool:
        """Queue a chunk; False once the reader has stopped and will take no more."""
        await self._room.acquire()
        if self.reader_gone:
            return False
        self._queue.put(chunk)
        return True

    def finish(self) -> None:
        self._queue.put(_EOF)

    def abort(self) -> None:
        self._aborted.set()
        self._queue.put(_EOF)  # wakes a reader blocked on an empty queue

    def _reader_stopped(self) -> None:
        self.reader_gone = True
        self._room.release()

    # Upload-thread side.

    def reader_done(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._reader_stopped)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        wanted = size if size is not None and size >= 0 else None
        pieces: builtins.list[memoryview] = []
        taken = 0
        while (wanted is None or taken < wanted) and not self._eof:
            if self._aborted.is_set():
                raise _UploadAborted("the upload stream failed or was cancelled")
            if not self._current:
                item = self._queue.get()
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._room.release)
                if item is _EOF:
                    self._eof = True
                    break
                self._current = memoryview(cast(bytes, item))
            piece = self._current if wanted is None else self._current[: wanted - taken]
            self._current = self._current[len(piece) :]
            pieces.append(piece)
            taken += len(piece)
        if self._aborted.is_set():
            # Checked again at the end of the stream, or minio would complete the upload.
            raise _UploadAborted("the upload stream failed or was cancelled")
        return b"".join(pieces)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# -------------------------------------------------------------------- the protocol


class ObjectStore(ABC):
    """Async object storage. Implementations: `FileObjectStore`, `S3ObjectStore`.

    Writes are atomic per object: readers see the old object or the new one, never a
    partial one. Missing keys raise `ObjectNotFound` on reads; `stat` returns None.
    """

    @abstractmethod
    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes] | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store an async stream of byte chunks, or a local file given by path.

        Memory stays bounded whatever the object's size. `metadata` names are
        letters, digits and `-`, case-insensitive (stored lowercased); values are
        printable ASCII. An existing object under `key` is replaced only once the
        whole stream has been stored: if the stream raises or the caller is cancelled
        before its end, nothing changes.
        """

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store a small object held in memory."""

        async def one_chunk() -> AsyncIterator[bytes]:
            yield bytes(data)

        return await self.put_stream(key, one_chunk(), content_type=content_type, metadata=metadata)

    async def adopt_file(
        self,
        key: str,
        path: Path,
        *,
        etag: str | None = None,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store the local file `path` under `key` and take it over: `path` is gone
        afterwards. Backends that can move it into place instead of copying it do (a
        finished download then costs no second pass over its bytes)."""
        info = await self.put_stream(key, path, content_type=content_type, metadata=metadata)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        return info

    @abstractmethod
    def get_stream(
        self, key: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Yield the object's bytes from `offset`, at most `length` of them.

        A range reaching past the end is cut at the end. `ObjectNotFound` is raised
        on the first iteration. Close early exits with `contextlib.aclosing`.
        """

    async def get_bytes(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read a small object (or a range of one) into memory."""
        parts: builtins.list[bytes] = []
        async with contextlib.aclosing(
            self.get_stream(key, offset=offset, length=length)
        ) as stream:
            async for chunk in stream:
                parts.append(chunk)
        return b"".join(parts)

    @abstractmethod
    async def stat(self, key: str) -> ObjectInfo | None:
        """Size, etag, content type, metadata and modification time; None if missing."""

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing key is not an error."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix`; return how many.

        The prefix matches characters, as in S3: `models/a` also matches `models/ab/x`;
        end it with `/` to stay inside one "directory". An empty prefix is refused.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        """Yield the objects whose key starts with `prefix`, sorted by key."""

    @abstractmethod
    async def ensure_ready(self) -> None:
        """Create what the store needs (directory, bucket); safe to call repeatedly."""

    @abstractmethod
    async def check(self) -> None:
        """Readiness probe: raise `DependencyUnavailable` if the store cannot serve."""

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _require_prefix_for_delete(prefix: str) -> str:
    if not prefix:
        raise ValueError("delete_prefix needs a non-empty prefix; it would delete everything")
    return _validate_prefix(prefix)


def _check_source(chunks: object) -> None:
    if isinstance(chunks, os.PathLike) or hasattr(chunks, "__aiter__"):
        return
    raise TypeError(
        "put_stream takes an async iterable of bytes or a pathlib.Path; "
        "use put_bytes for bytes in memory"
    )


# -------------------------------------------------------------------- file backend


@dataclass(frozen=True, slots=True)
class _Sidecar:
    key: str
    size: int
    etag: str
    content_type: str
    metadata: dict[str, str]


class FileObjectStore(ObjectStore):
    """Objects as files under `root`.

    Layout: `data/<key>` holds the bytes (so `path_for(key)` is a real file other
    processes can open), `meta/<hh>/<sha256(key)>.json` the size, etag, content type
    and metadata, and `tmp/` the files being written. Temporary files live in `tmp/`
    rather than beside their target so listings never see them; `tmp/` is on the same
    filesystem, which is what makes the final `os.replace` atomic.
    """

    # Temporary files untouched this long belong to writers that died.
    STALE_TEMP_SECONDS: Final = 24 * 3600

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._data = self.root / "data"
        self._meta = self.root / "meta"
        self._tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"FileObjectStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file holding the object's bytes (it need not exist)."""
        path = self._data.joinpath(*validate_key(key).split("/"))
        # validate_key already rules out escapes; this guards against future edits.
        if not path.is_relative_to(self._data):
            raise ValueError(f"object key {key!r} escapes the store root")
        return path

    def _sidecar_path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._meta / digest[:2] / f"{digest}.json"

    # Writes.

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes] | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        target = self.path_for(key)
        meta = _normalize_metadata(metadata)
        kind = _normalize_content_type(content_type)
        _check_source(chunks)
        if isinstance(chunks, os.PathLike):
            source = Path(chunks)
            return await _run_in_own_thread(
                lambda: self._put_file(key, target, source, kind, meta), name="file-store-put"
            )
        return await self._put_iterable(key, target, chunks, kind, meta)

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        target = self.path_for(key)
        meta = _normalize_metadata(metadata)
        kind = _normalize_content_type(content_type)
        payload = bytes(data)

        def write() -> ObjectInfo:
            file, temp = self._open_temp()
            try:
                file.write(payload)
            except BaseException:
                self._discard(file, temp)
                raise
            digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
            return self._commit(file, temp, key, target, len(payload), digest, kind, meta)

        return await asyncio.to_thread(write)

    async def _put_iterable(
        self,
        key: str,
        target: Path,
        chunks: AsyncIterable[bytes],
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo:
        file, temp = await asyncio.to_thread(self._open_temp)
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        pending: builtins.list[bytes] = []
        pending_bytes = 0

        def write(batch: builtins.list[bytes]) -> None:
            for piece in batch:
                md5.update(piece)
                file.write(piece)

        try:
            async for chunk in chunks:
                pending.append(chunk)
                pending_bytes += len(chunk)
                size += len(chunk)
                # Batch small chunks so each thread hop moves a useful amount.
                if pending_bytes >= READ_CHUNK_BYTES:
                    batch, pending, pending_bytes = pending, [], 0
                    await asyncio.to_thread(write, batch)
            await asyncio.to_thread(write, pending)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._discard, file, temp))
            raise
        # The commit is a few renames that must not stop halfway; a cancellation that
        # arrives meanwhile is delivered once it is done.
        committing = asyncio.ensure_future(
            asyncio.to_thread(
                self._commit, file, temp, key, target, size, md5.hexdigest(), content_type, metadata
            )
        )
        try:
            return await asyncio.shield(committing)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await committing
            raise

    def _put_file(
        self, key: str, target: Path, source: Path, content_type: str, metadata: dict[str, str]
    ) -> ObjectInfo:
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        file, temp = self._open_temp()
        try:
            with open(source, "rb") as reader:
                while block := reader.read(READ_CHUNK_BYTES):
                    md5.update(block)
                    file.write(block)
                    size += len(block)
        except BaseException:
            self._discard(file, temp)
            raise
        return self._commit(file, temp, key, target, size, md5.hexdigest(), content_type, metadata)

    async def adopt_file(
        self,
        key: str,
        path: Path,
        *,
        etag: str | None = None,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        target = self.path_for(key)
        meta = _normalize_metadata(metadata)
        kind = _normalize_content_type(content_type)

        def adopt() -> ObjectInfo | None:
            self._tmp.mkdir(parents=True, exist_ok=True)
            temp = self._tmp / f"{secrets.token_hex(12)}.part"
            try:
                os.replace(path, temp)
            except OSError as err:
                if err.errno == errno.EXDEV:
                    return None
                raise
            file = open(temp, "r+b")  # noqa: SIM115 - _commit closes it
            size = os.fstat(file.fileno()).st_size
            digest = etag or _md5_file(temp)
            return self._commit(file, temp, key, target, size, digest, kind, meta)

        adopted = await asyncio.to_thread(adopt)
        if adopted is not None:
            return adopted
        # Another filesystem: copy, then let go of the original.
        return await super().adopt_file(key, path, content_type=content_type, metadata=metadata)

    def _open_temp(self) -> tuple[BinaryIO, Path]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        temp = self._tmp / f"{secrets.token_hex(12)}.part"
        # Plain 0o666 (less the umask), unlike mkstemp's 0o600: engines running as
        # other users may read model files straight from `path_for`.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        return os.fdopen(descriptor, "wb"), temp

    @staticmethod
    def _discard(file: BinaryIO, temp: Path) -> None:
        with contextlib.suppress(OSError):
            file.close()
        temp.unlink(missing_ok=True)

    def _commit(
        self,
        file: BinaryIO,
        temp: Path,
        key: str,
        target: Path,
        size: int,
        etag: str,
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo:
        try:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            # The sidecar goes first: between the two renames a reader sees no object
            # (new key), or the old bytes with a sidecar whose size disowns them and so
            # is ignored (overwrite; unless both versions have the same size).
            self._prepare_parent(key, target)
            self._write_sidecar(_Sidecar(key, size, etag, content_type, metadata))
            for attempt in itertools.count():
                try:
                    os.replace(temp, target)
                    break
                except FileNotFoundError:
                    # A concurrent delete pruned the now-empty parent directory.
                    if attempt >= 3:
                        raise
                    self._prepare_parent(key, target)
        except BaseException:
            self._discard(file, temp)
            raise
        stats = target.stat()
        return ObjectInfo(
            key=key,
            size=size,
            etag=etag,
            last_modified=datetime.fromtimestamp(stats.st_mtime, tz=UTC),
            content_type=content_type,
            metadata=dict(metadata),
        )

    def _prepare_parent(self, key: str, target: Path) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ValueError(
                f"object key {key!r} conflicts with an existing object that is one of its "
                "parent paths; the file backend cannot hold both"
            ) from exc
        if target.is_dir():
            raise ValueError(
                f"object key {key!r} conflicts with existing objects below it; "
                "the file backend cannot hold both"
            )

    def _write_sidecar(self, sidecar: _Sidecar) -> None:
        path = self._sidecar_path(sidecar.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        file, temp = self._open_temp()
        try:
            payload = {
                "key": sidecar.key,
                "size": sidecar.size,
                "etag": sidecar.etag,
                "content_type": sidecar.content_type,
                "metadata": sidecar.metadata,
            }
            file.write(json.dumps(payload, sort_keys=True).encode())
            file.close()
            os.replace(temp, path)
        except BaseException:
            self._discard(file, temp)
            raise

    def _read_sidecar(self, key: str) -> _Sidecar | None:
        try:
            raw = json.loads(self._sidecar_path(key).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict) or raw.get("key") != key:
            return None
        try:
            return _Sidecar(
                key=key,
                size=int(raw["size"]),
                etag=str(raw["etag"]),
                content_type=str(raw["content_type"]),
                metadata={str(name): str(value) for name, value in raw["metadata"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def _info(self, key: str, stats: os.stat_result, *, with_details: bool) -> ObjectInfo:
        sidecar = self._read_sidecar(key)
        modified = datetime.fromtimestamp(stats.st_mtime, tz=UTC)
        if sidecar is None or sidecar.size != stats.st_size:
            # Placed by hand, or caught between the two renames of an overwrite: no
            # trustworthy MD5, so a weak etag from size and mtime.
            return ObjectInfo(
                key=key,
                size=stats.st_size,
                etag=f"W-{stats.st_size:x}-{stats.st_mtime_ns:x}",
                last_modified=modified,
                content_type=DEFAULT_CONTENT_TYPE if with_details else None,
            )
        return ObjectInfo(
            key=key,
            size=stats.st_size,
            etag=sidecar.etag,
            last_modified=modified,
            content_type=sidecar.content_type if with_details else None,
            metadata=dict(sidecar.metadata) if with_details else {},
        )

    # Reads.

    async def get_stream(
        self, key: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        path = self.path_for(key)
        _validate_range(offset, length)

        def open_at() -> BinaryIO:
            try:
                file = open(path, "rb")  # noqa: SIM115 - closed in the finally below
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise ObjectNotFound(key) from None
            file.seek(offset)
            return file

        file = await asyncio.to_thread(open_at)
        try:
            remaining = length
            while remaining is None or remaining > 0:
                size = READ_CHUNK_BYTES if remaining is None else min(remaining, READ_CHUNK_BYTES)
                chunk = await asyncio.to_thread(file.read, size)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            file.close()

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self.path_for(key)

        def stat_sync() -> ObjectInfo | None:
            try:
                stats = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat_module.S_ISREG(stats.st_mode):
                return None
            return self._info(key, stats, with_details=True)

        return await asyncio.to_thread(stat_sync)

    # Deletes.

    async def delete(self, key: str) -> None:
        path = self.path_for(key)
        await asyncio.to_thread(self._delete_sync, key, path)

    def _delete_sync(self, key: str, path: Path) -> None:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:
            return  # a "directory" of other objects, not an object
        self._sidecar_path(key).unlink(missing_ok=True)
        self._prune_empty_parents(path)

    def _prune_empty_parents(self, path: Path) -> None:
        parent = path.parent
        while parent != self._data and parent.is_relative_to(self._data):
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent

    async def delete_prefix(self, prefix: str) -> int:
        _require_prefix_for_delete(prefix)
        deleted = 0
        batch: builtins.list[str] = []

        def delete_batch(keys: builtins.list[str]) -> None:
            for key in keys:
                self._delete_sync(key, self.path_for(key))

        async for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) >= 1000:
                await asyncio.to_thread(delete_batch, batch)
                deleted += len(batch)
                batch = []
        await asyncio.to_thread(delete_batch, batch)
        return deleted + len(batch)

    # Listing.

    async def list(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        _validate_prefix(prefix)
        # A depth-first walk whose siblings are ordered by name, with "/" appended to
        # directory names, visits keys in the order S3 lists them (code-point order).
        # It starts in the deepest directory the prefix names in full.
        stack: builtins.list[_Entry] = [_Entry(prefix.rpartition("/")[0], True, None)]
        while stack:
            entry = stack.pop()
            if entry.info is not None:
                yield entry.info
            elif entry.is_dir:
                found = await asyncio.to_thread(self._scan, entry.key, prefix)
                stack.extend(reversed(found))

    def _scan(self, directory_key: str, prefix: str) -> builtins.list[_Entry]:
        """One directory's entries that can hold keys starting with `prefix`, sorted."""
        directory = self._data.joinpath(*directory_key.split("/")) if directory_key else self._data
        base = f"{directory_key}/" if directory_key else ""
        try:
            with os.scandir(directory) as listing:
                # Symlinked directories are not followed: a loop would never end.
                names = [(item.name, item.is_dir(follow_symlinks=False)) for item in listing]
        except (FileNotFoundError, NotADirectoryError):
            return []
        names.sort(key=lambda item: item[0] + "/" if item[1] else item[0])
        entries: builtins.list[_Entry] = []
        for name, is_dir in names:
            key = base + name
            if is_dir:
                if _may_contain(key + "/", prefix):
                    entries.append(_Entry(key, True, None))
            elif key.startswith(prefix):
                info = self._list_entry(key)
                if info is not None:
                    entries.append(_Entry(key, False, info))
        return entries

    def _list_entry(self, key: str) -> ObjectInfo | None:
        try:
            stats = self.path_for(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None  # deleted while we walked
        except ValueError:
            return None  # a stray file whose name no valid key can reach
        if not stat_module.S_ISREG(stats.st_mode):
            return None
        return self._info(key, stats, with_details=False)

    # Lifecycle.

    async def ensure_ready(self) -> None:
        def prepare() -> None:
            for directory in (self._data, self._meta, self._tmp):
                directory.mkdir(parents=True, exist_ok=True)
            cutoff = time.time() - self.STALE_TEMP_SECONDS
            with os.scandir(self._tmp) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_file() and entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)

        await asyncio.to_thread(prepare)

    async def check(self) -> None:
        def probe() -> None:
            for directory in (self._data, self._meta, self._tmp):
                if not directory.is_dir():
                    raise FileNotFoundError(errno.ENOENT, "missing directory", str(directory))
            file, temp = self._open_temp()
            self._discard(file, temp)

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise DependencyUnavailable(
                f"object store directory is not writable: {exc.strerror or exc}",
                dependency="object_store",
            ) from exc


@dataclass(frozen=True, slots=True)
class _Entry:
    key: str
    is_dir: bool
    info: ObjectInfo | None


def _may_contain(directory_prefix: str, prefix: str) -> bool:
    """Whether keys under `directory_prefix` (ending in '/') can start with `prefix`."""
    return directory_prefix.startswith(prefix) or prefix.startswith(directory_prefix)


# ---------------------------------------------------------------------- S3 backend


def _http_pool(
    *, connect: float, read: float, retries: int, ca_file: str | None
) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect, read=read),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_file or certifi.where(),
        retries=urllib3.Retry(
            total=retries,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
        ),
    )


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of MinIO or any S3-compatible service.

    `endpoint` is `host[:port]` without a scheme; `secure` picks https. Streams of
    unknown length upload as multipart in parts of `part_size` bytes (5 MiB to 5 GiB),
    which caps such an object at 10,000 parts; a few parts are in memory at a time.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        region: str | None = "us-east-1",
        secure: bool = True,
        part_size: int = 16 * 1024 * 1024,
        parallel_uploads: int = 3,
        ca_file: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        probe_timeout: float = 3.0,
    ) -> None:
        if not endpoint:
            raise ValueError("S3 endpoint is required (host[:port])")
        if "://" in endpoint or "/" in endpoint:
            raise ValueError(
                f"S3 endpoint {endpoint!r} must be host[:port] without a scheme or path; "
                "set secure=false for plain http"
            )
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError("S3 part_size must be between 5 MiB and 5 GiB")
        if not bucket:
            raise ValueError("S3 bucket is required")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self.parallel_uploads = parallel_uploads
        self._pools = (
            _http_pool(connect=connect_timeout, read=read_timeout, retries=5, ca_file=ca_file),
            # Readiness probes must answer fast: no retries, short timeouts.
            _http_pool(connect=probe_timeout, read=probe_timeout, retries=0, ca_file=ca_file),
        )
        self._client, self._probe = (
            Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=pool,
            )
            for pool in self._pools
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ObjectStore:
        s3 = settings.s3
        return cls(
            endpoint=s3.endpoint,
            access_key=s3.access_key.get_secret_value(),
            secret_key=s3.secret_key.get_secret_value(),
            bucket=s3.bucket,
            region=s3.region or None,
            secure=s3.secure,
            part_size=settings.storage.multipart_chunk_bytes,
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    def _unavailable(self, exc: BaseException) -> DependencyUnavailable:
        return DependencyUnavailable(
            f"object store is unavailable ({type(exc).__name__})", dependency="object_store"
        )

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (urllib3.exceptions.HTTPError, ServerError, InvalidResponseError) as exc:
            raise self._unavailable(exc) from exc

    async def _in_own_thread(self, fn: Callable[[], T], *, name: str) -> T:
        try:
            return await _run_in_own_thread(fn, name=name)
        except (urllib3.exceptions.HTTPError, ServerError, InvalidResponseError) as exc:
            raise self._unavailable(exc) from exc

    @staticmethod
    def _headers(metadata: dict[str, str]) -> dict[str, str | builtins.list[str] | tuple[str]]:
        # Prefixed here so minio never mistakes a name like `content-type` for a header.
        return {_S3_USER_METADATA + name: value for name, value in metadata.items()}

    # Writes.

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes] | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        meta = _normalize_metadata(metadata)
        kind = _normalize_content_type(content_type)
        _check_source(chunks)
        if isinstance(chunks, os.PathLike):
            await self._put_file(key, Path(chunks), kind, meta)
        else:
            await self._put_iterable(key, chunks, kind, meta)
        return await self._stat_required(key)

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        meta = _normalize_metadata(metadata)
        kind = _normalize_content_type(content_type)
        payload = bytes(data)
        await self._call(
            self._client.put_object,
            self.bucket,
            key,
            io.BytesIO(payload),
            len(payload),
            content_type=kind,
            metadata=self._headers(meta),
            part_size=self.part_size,
        )
        return await self._stat_required(key)

    async def _put_file(
        self, key: str, source: Path, content_type: str, metadata: dict[str, str]
    ) -> None:
        size = (await asyncio.to_thread(source.stat)).st_size
        # A known size may need bigger parts than configured to fit in 10,000.
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        await self._in_own_thread(
            functools.partial(
                self._client.fput_object,
                self.bucket,
                key,
                str(source),
                content_type=content_type,
                metadata=self._headers(metadata),
                part_size=part_size,
                num_parallel_uploads=self.parallel_uploads,
            ),
            name="s3-upload-file",
        )

    async def _put_iterable(
        self, key: str, chunks: AsyncIterable[bytes], content_type: str, metadata: dict[str, str]
    ) -> None:
        pipe = _UploadPipe(asyncio.get_running_loop(), _UPLOAD_QUEUE_CHUNKS)

        def upload() -> None:
            try:
                # length=-1 makes minio read part_size at a time and upload multipart.
                self._client.put_object(
                    self.bucket,
                    key,
                    cast(BinaryIO, pipe),
                    -1,
                    content_type=content_type,
                    metadata=self._headers(metadata),
                    part_size=self.part_size,
                    num_parallel_uploads=self.parallel_uploads,
                )
            finally:
                pipe.reader_done()

        uploading = asyncio.ensure_future(self._in_own_thread(upload, name="s3-upload"))
        stopped_early = False
        try:
            async for chunk in chunks:
                if chunk and not await pipe.feed(chunk):
                    stopped_early = True  # awaiting the upload below says why
                    break
            else:
                pipe.finish()
            # Shielded: a cancelled caller must abort the upload, not abandon its thread.
            await asyncio.shield(uploading)
        except BaseException:
            # Makes minio's next read raise, so it aborts the multipart upload it
            # started; once minio has read the end of the stream the upload completes.
            pipe.abort()
            with contextlib.suppress(Exception):
                await asyncio.shield(uploading)
            raise
        if stopped_early:
            raise RuntimeError(f"upload of {key!r} stopped before the stream ended")

    # Reads.

    async def get_stream(
        self, key: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        validate_key(key)
        _validate_range(offset, length)
        if length == 0:
            # minio reads length 0 as "to the end"; only existence matters here.
            if await self.stat(key) is None:
                raise ObjectNotFound(key)
            return
        try:
            response = await self._call(
                self._client.get_object, self.bucket, key, offset=offset, length=length or 0
            )
        except S3Error as exc:
            if exc.code in _S3_MISSING_CODES:
                raise ObjectNotFound(key) from None
            if exc.code == "InvalidRange":
                # The offset is at or past the end: an empty range, as the file backend.
                if await self.stat(key) is None:
                    raise ObjectNotFound(key) from None
                return
            raise
        try:
            while chunk := await self._call(response.read, READ_CHUNK_BYTES):
                yield chunk
        finally:
            response.close()
            response.release_conn()

    async def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            found = await self._call(self._client.stat_object, self.bucket, key)
        except S3Error as exc:
            if exc.code in _S3_MISSING_CODES:
                return None
            raise
        return _info_from_minio(key, found, with_details=True)

    async def _stat_required(self, key: str) -> ObjectInfo:
        info = await self.stat(key)
        if info is None:
            # Only a concurrent delete gets here.
            raise ObjectNotFound(key)
        return info

    # Deletes.

    async def delete(self, key: str) -> None:
        validate_key(key)
        try:
            await self._call(self._client.remove_object, self.bucket, key)
        except S3Error as exc:
            if exc.code not in _S3_MISSING_CODES:
                raise

    async def delete_prefix(self, prefix: str) -> int:
        _require_prefix_for_delete(prefix)
        deleted = 0
        batch: builtins.list[str] = []
        async for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) >= 1000:  # the most one S3 DeleteObjects request takes
                deleted += await self._delete_batch(batch)
                batch = []
        if batch:
            deleted += await self._delete_batch(batch)
        return deleted

    async def _delete_batch(self, keys: builtins.list[str]) -> int:
        def remove() -> builtins.list[str]:
            # remove_objects is lazy: the requests happen while its result is iterated.
            errors = self._client.remove_objects(self.bucket, (DeleteObject(k) for k in keys))
            return [
                f"{error.name}: {error.code}"
                for error in errors
                if error.code not in _S3_MISSING_CODES
            ]

        failures = await self._call(remove)
        if failures:
            raise RuntimeError(
                f"could not delete {len(failures)} objects: " + "; ".join(failures[:5])
            )
        return len(keys)

    # Listing.

    async def list(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        _validate_prefix(prefix)
        listing = await self._call(
            self._client.list_objects, self.bucket, prefix=prefix or None, recursive=True
        )
        iterator = iter(listing)
        while True:
            # The listing pages lazily; each page is a blocking request.
            page = await self._call(lambda: builtins.list(itertools.islice(iterator, 1000)))
            if not page:
                return
            for found in page:
                if found.object_name is None or found.is_dir:
                    continue
                yield _info_from_minio(found.object_name, found, with_details=False)

    # Lifecycle.

    async def ensure_ready(self) -> None:
        try:
            if await self._call(self._client.bucket_exists, self.bucket):
                return
            await self._call(self._client.make_bucket, self.bucket, location=self.region)
        except S3Error as exc:
            if exc.code not in _S3_BUCKET_EXISTS_CODES:
                raise

    async def check(self) -> None:
        try:
            exists = await asyncio.to_thread(self._probe.bucket_exists, self.bucket)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if not exists:
            raise DependencyUnavailable(
                f"object store bucket {self.bucket!r} does not exist",
                dependency="object_store",
            )

    async def close(self) -> None:
        for pool in self._pools:
            await asyncio.to_thread(pool.clear)


def _info_from_minio(key: str, found: MinioObject, *, with_details: bool) -> ObjectInfo:
    metadata: dict[str, str] = {}
    if with_details and found.metadata is not None:
        for name, value in found.metadata.items():
            lowered = name.lower()
            if lowered.startswith(_S3_USER_METADATA):
                metadata[lowered[len(_S3_USER_METADATA) :]] = str(value)
    return ObjectInfo(
        key=key,
        size=found.size or 0,
        etag=(found.etag or "").strip('"'),
        last_modified=found.last_modified or datetime.fromtimestamp(0, tz=UTC),
        content_type=(found.content_type or DEFAULT_CONTENT_TYPE) if with_details else None,
        metadata=metadata,
    )


# ------------------------------------------------------------------------- factory


def create_object_store(settings: Settings) -> ObjectStore:
    """The store the settings describe: `file` under `objects_dir`, or `s3`."""
    if settings.storage.backend == "s3":
        return S3ObjectStore.from_settings(settings)
    return FileObjectStore(settings.objects_dir)
