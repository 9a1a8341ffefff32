"""Where model files come from: Hugging Face repositories, local directories, S3 prefixes
and plain HTTP(S) URLs.

`resolve` pins a source (a Hugging Face branch becomes the commit it points to) and lists
its files; `open_file` streams one file from an offset; `download_file` brings one file
into the object store under its content address, resuming from a staging `.part` file.

Failures are sorted for the workflow: `SourceNotFound`, `SourceRefused` and
`IntegrityError` carry the non-retryable failure type the activity raises; a
`SourceUnavailable` is transient and worth a retry that resumes where the bytes stopped.
Messages never contain a token, a secret or a URL's query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import stat as stat_module
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, ClassVar, Final, Self, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
import httpx2
import urllib3
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo, RepoFile
from huggingface_hub.utils._validators import validate_repo_id
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from control_plane.core.storage import ObjectStore, content_key
from workflows.contracts.models import (
    INTEGRITY_FAILED,
    SOURCE_NOT_FOUND,
    SOURCE_REFUSED,
    SourceFile,
    SourceKind,
)

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_HF_REVISION",
    "PROGRESS_EVERY_BYTES",
    "IntegrityError",
    "ModelSource",
    "Resolved",
    "S3Access",
    "SourceError",
    "SourceNotFound",
    "SourceRefused",
    "SourceUnavailable",
    "StoredFile",
    "download_file",
    "open_file",
    "part_name",
    "resolve",
]

T = TypeVar("T")

CHUNK_BYTES: Final = 1024 * 1024
PROGRESS_EVERY_BYTES: Final = 8 * 1024 * 1024
# Chunks are written (and hashed) in batches of this size, one batch in flight.
WRITE_BATCH_BYTES: Final = 4 * 1024 * 1024
DEFAULT_HF_REVISION: Final = "main"

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")
_HTTP_TIMEOUT = httpx.Timeout(30.0, connect=10.0, read=120.0)
# S3 error codes that say the bucket or prefix is not there, or that retrying may help.
_S3_MISSING = frozenset({"NoSuchBucket", "NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_S3_TRANSIENT = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})


# -------------------------------------------------------------------------- errors


class SourceError(Exception):
    """A source failed; `failure_type` is the contract's non-retryable type, if any."""

    failure_type: ClassVar[str | None] = None


class SourceNotFound(SourceError):
    failure_type = SOURCE_NOT_FOUND


class SourceRefused(SourceError):
    """The source exists but will not give us its files (credentials, gating, policy)."""

    failure_type = SOURCE_REFUSED


class SourceUnavailable(SourceError):
    """Outage, rate limit or broken connection: retry, resuming from the last offset."""


class IntegrityError(SourceError):
    """The bytes received are not the bytes the source listed (size or sha256)."""

    failure_type = INTEGRITY_FAILED


def _redact(text: str, token: str | None, limit: int = 300) -> str:
    if token:
        text = text.replace(token, "***")
    return text[:limit]


def _display_url(url: str) -> str:
    # Presigned URLs carry their signature in the query string; credentials may sit in
    # the netloc. Neither belongs in an error message that ends up in workflow history.
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _http_failure(
    status: int,
    what: str,
    *,
    error_code: str | None = None,
    server_message: str | None = None,
    token: str | None = None,
) -> SourceError:
    detail = f"{what}: HTTP {status}"
    if error_code:
        detail += f" ({error_code})"
    if server_message:
        detail += f": {_redact(server_message, token)}"
    if status in (401, 403) or error_code == "GatedRepo":
        return SourceRefused(detail)
    if status in (404, 410):
        return SourceNotFound(detail)
    if status == 416:
        # We never ask past the listed size, so the file must have shrunk since.
        return IntegrityError(detail + " (the file is shorter than listed)")
    if status in (408, 429) or status >= 500:
        return SourceUnavailable(detail)
    return SourceRefused(detail)


# -------------------------------------------------------------------------- models


class ModelSource(BaseModel):
    """Where a model's files are.

    - `huggingface`: `ref` is a repository id (`org/name`); `revision` a branch, tag or
      commit (None means `main`).
    - `local`: `ref` is a directory on the worker's filesystem.
    - `s3`: `ref` is `s3://bucket/prefix`; `endpoint` (`https://minio:9000`, or
      `host:port`) for S3-compatible services and `region` are optional.
    - `url`: `ref` is an http(s) URL of one file, or a list of them; each file is named
      after its URL's last path segment.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: SourceKind
    ref: str | list[str]
    revision: str | None = None
    endpoint: str | None = None
    region: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.kind == SourceKind.CLOUD:
            raise ValueError("cloud models are served by their provider and have no files")
        if isinstance(self.ref, list) and self.kind != SourceKind.URL:
            raise ValueError("only url sources take a list of references")
        if self.revision is not None and self.kind != SourceKind.HUGGINGFACE:
            raise ValueError("revision applies to huggingface sources only")
        if (self.endpoint or self.region) and self.kind != SourceKind.S3:
            raise ValueError("endpoint and region apply to s3 sources only")
        if self.kind == SourceKind.HUGGINGFACE:
            validate_repo_id(str(self.ref))
        elif self.kind == SourceKind.LOCAL:
            # Relative paths would depend on the worker's working directory.
            if not Path(str(self.ref)).is_absolute():
                raise ValueError("a local source needs an absolute directory path")
        elif self.kind == SourceKind.S3:
            _parse_s3_ref(str(self.ref))
        elif self.kind == SourceKind.URL:
            urls = self.urls
            if not urls:
                raise ValueError("a url source needs at least one URL")
            names = [_url_file_name(url) for url in urls]
            if len(set(names)) != len(names):
                raise ValueError("two URLs end in the same file name")
        return self

    @property
    def urls(self) -> list[str]:
        return list(self.ref) if isinstance(self.ref, list) else [self.ref]


class Resolved(BaseModel):
    """A source pinned and listed: what `open_file` and `download_file` work from."""

    # Hugging Face: the 40-hex commit the requested revision pointed to.
    revision: str | None = None
    files: list[SourceFile] = Field(default_factory=list)
    # Hugging Face: the model card metadata plus `pipeline_tag`, `tags` and `license`.
    card: dict[str, Any] | None = None
    # Every file name of the source, for license detection (`LICENSE`, `README.md`...).
    siblings: list[str] = Field(default_factory=list)

    def file(self, path: str) -> SourceFile:
        for found in self.files:
            if found.path == path:
                return found
        raise KeyError(path)


class StoredFile(BaseModel):
    path: str
    size: int
    sha256: str
    key: str
    # True when the store already held this content and nothing was uploaded.
    reused: bool = False


@dataclass(frozen=True, slots=True)
class S3Access:
    """How to reach an S3 source; anonymous without keys. Built from an AWS credential."""

    # `host[:port]` or a URL; None means AWS S3.
    endpoint: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    secure: bool = True
    session_token: str | None = field(default=None, repr=False)


# ------------------------------------------------------------------------- helpers


def _safe_path(path: str, what: str) -> str:
    """`path` if it is a plain relative path that stays inside the model, else refuse."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise SourceRefused(f"{what} lists a file with an unsafe path {path[:200]!r}")
    return path


def _url_file_name(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{_display_url(url)!r} is not an http(s) URL")
    name = unquote(PurePosixPath(parts.path).name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{_display_url(url)!r} does not end in a file name")
    return name


def _parse_s3_ref(ref: str) -> tuple[str, str]:
    parts = urlsplit(ref)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError("an s3 source is s3://bucket/prefix")
    return parts.netloc, parts.path.lstrip("/")


# ------------------------------------------------------------------------- resolve


async def resolve(
    source: ModelSource,
    *,
    token: str | None = None,
    hf_endpoint: str | None = None,
    s3: S3Access | None = None,
) -> Resolved:
    """Pin `source` and list its files (sorted by path).

    `token` authenticates Hugging Face (and plain URLs, as a bearer token); `hf_endpoint`
    defaults to `HF_ENDPOINT` as huggingface_hub read it; `s3` reaches S3 sources.
    """
    match source.kind:
        case SourceKind.HUGGINGFACE:
            return await _resolve_hf(source, token=token, hf_endpoint=hf_endpoint)
        case SourceKind.LOCAL:
            return await asyncio.to_thread(_resolve_local, Path(str(source.ref)))
        case SourceKind.S3:
            return await _resolve_s3(source, s3)
        case SourceKind.URL:
            return await _resolve_urls(source, token=token)
    raise ValueError(f"unsupported source kind {source.kind!r}")


def _with_siblings(files: list[SourceFile], **values: Any) -> Resolved:
    files.sort(key=lambda found: found.path)
    return Resolved(files=files, siblings=[found.path for found in files], **values)


# Hugging Face.


def _hf_api(hf_endpoint: str | None, token: str | None) -> HfApi:
    # False, not None: None makes huggingface_hub fall back to the worker's own saved
    # token or HF_TOKEN, lending the server's identity to every tenant's download.
    return HfApi(
        endpoint=hf_endpoint.rstrip("/") if hf_endpoint else None,
        token=token or False,
        library_name="control-plane",
    )


def _hf_failure(exc: Exception, what: str, token: str | None) -> SourceError:
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        code = exc.response.headers.get("X-Error-Code")
        message = exc.server_message
        if isinstance(exc, GatedRepoError):
            return SourceRefused(f"{what} is gated: accept its conditions with the token's user")
        if isinstance(exc, RepositoryNotFoundError) and status == 401:
            # The Hub answers 401 for private repositories and, to anonymous callers,
            # for ones that do not exist; it never says which.
            return SourceRefused(
                f"{what} was not found, or is private and needs a token that grants access"
            )
        if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
            return SourceNotFound(f"{what} was not found (HTTP {status}, {code})")
        if isinstance(exc, RemoteEntryNotFoundError):
            return SourceNotFound(f"{what}: path not found (HTTP {status})")
        return _http_failure(status, what, error_code=code, server_message=message, token=token)
    return SourceUnavailable(f"{what}: {type(exc).__name__}: {_redact(str(exc), token)}")


# Errors from huggingface_hub's calls that say something about the Hub, not our code.
_HF_ERRORS = (HfHubHTTPError, httpx2.HTTPError, OSError)


async def _resolve_hf(
    source: ModelSource, *, token: str | None, hf_endpoint: str | None
) -> Resolved:
    api = _hf_api(hf_endpoint, token)
    repo = str(source.ref)
    revision = source.revision or DEFAULT_HF_REVISION
    what = f"Hugging Face repository {repo!r} at {revision!r}"
    try:
        info = await asyncio.to_thread(api.model_info, repo, revision=revision)
        sha = info.sha or ""
        if not _COMMIT_SHA.fullmatch(sha):
            raise SourceRefused(f"{what}: the endpoint named no commit; is it a Hub?")
        # Listing at the sha, not the branch, so a push in between cannot mix commits.
        entries = await asyncio.to_thread(
            lambda: list(api.list_repo_tree(repo, revision=sha, recursive=True))
        )
    except _HF_ERRORS as exc:
        raise _hf_failure(exc, what, token) from None
    files = [
        SourceFile(
            path=_safe_path(entry.path, what),
            size=entry.size,
            sha256=entry.lfs.sha256.lower() if entry.lfs else None,
            etag=entry.lfs.sha256.lower() if entry.lfs else entry.blob_id,
        )
        for entry in entries
        if isinstance(entry, RepoFile)
    ]
    resolved = _with_siblings(files, revision=sha, card=_hf_card(info))
    if info.siblings:
        resolved.siblings = sorted(sibling.rfilename for sibling in info.siblings)
    return resolved


def _hf_card(info: ModelInfo) -> dict[str, Any]:
    card: dict[str, Any] = {}
    if info.card_data is not None:
        card = dict(info.card_data.to_dict())  # type: ignore[no-untyped-call]
    card_tags = card.get("tags") or []
    tags = list(info.tags or ([card_tags] if isinstance(card_tags, str) else card_tags))
    license_id = card.get("license") or next(
        (tag.removeprefix("license:") for tag in tags if tag.startswith("license:")), None
    )
    card.update(
        pipeline_tag=info.pipeline_tag or card.get("pipeline_tag"),
        tags=tags,
        license=license_id,
    )
    return card


# Local directories.


def _resolve_local(root: Path) -> Resolved:
    """List a directory's regular files.

    Hidden entries (`.git`, `.gitattributes`, `.cache`...) are version-control or tool
    state, never model content, and are skipped. Symbolic links are followed when they
    stay inside the directory and refused when they leave it. Sockets, FIFOs and devices
    are skipped: reading one could block forever.
    """
    what = f"local directory {str(root)!r}"
    try:
        real_root = root.resolve(strict=True)
        if not real_root.is_dir():
            raise SourceNotFound(f"{what} is not a directory")
        files: list[SourceFile] = []
        top = real_root.stat()
        _walk_local(real_root, real_root, PurePosixPath(), files, {(top.st_dev, top.st_ino)})
    except FileNotFoundError:
        raise SourceNotFound(f"{what} does not exist") from None
    except PermissionError:
        raise SourceRefused(f"{what} is not readable by the worker") from None
    if not files:
        raise SourceNotFound(f"{what} holds no files")
    return _with_siblings(files)


def _walk_local(
    root: Path,
    directory: Path,
    relative: PurePosixPath,
    files: list[SourceFile],
    seen: set[tuple[int, int]],
) -> None:
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=lambda entry: entry.name)
    for entry in ordered:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        name = str(relative / entry.name)
        if entry.is_symlink() and not path.resolve().is_relative_to(root):
            raise SourceRefused(f"{name!r} is a symbolic link to outside the model directory")
        try:
            found = path.stat()
        except FileNotFoundError:
            raise SourceRefused(f"{name!r} is a broken symbolic link") from None
        if stat_module.S_ISDIR(found.st_mode):
            # A link back to a parent would otherwise walk forever.
            if (found.st_dev, found.st_ino) not in seen:
                seen.add((found.st_dev, found.st_ino))
                _walk_local(root, path, relative / entry.name, files, seen)
        elif stat_module.S_ISREG(found.st_mode):
            files.append(
                SourceFile(
                    path=name,
                    size=found.st_size,
                    etag=f"{found.st_size:x}-{found.st_mtime_ns:x}",
                )
            )


def _local_path(source: ModelSource, file: SourceFile) -> Path:
    root = Path(str(source.ref)).resolve(strict=True)
    # Checked again at open time: a link may have been swapped since `resolve`.
    path = root.joinpath(*_safe_path(file.path, "local source").split("/")).resolve(strict=True)
    if not path.is_relative_to(root):
        raise SourceRefused(f"{file.path!r} now points outside the model directory")
    return path


# S3.


def _minio(source: ModelSource, access: S3Access | None) -> Minio:
    access = access or S3Access()
    raw = source.endpoint or access.endpoint
    secure = access.secure
    if raw and "://" in raw:
        parts = urlsplit(raw)
        raw, secure = parts.netloc, parts.scheme == "https"
    return Minio(
        raw or "s3.amazonaws.com",
        access_key=access.access_key,
        secret_key=access.secret_key,
        session_token=access.session_token,
        secure=secure,
        region=source.region or access.region,
    )


async def _s3_call(fn: Callable[[], T], what: str) -> T:
    try:
        return await asyncio.to_thread(fn)
    except S3Error as exc:
        detail = f"{what}: S3 answered {exc.code}"
        if exc.code in _S3_MISSING:
            raise SourceNotFound(detail) from None
        if exc.code in _S3_TRANSIENT:
            raise SourceUnavailable(detail) from None
        raise SourceRefused(detail) from None
    except (urllib3.exceptions.HTTPError, ServerError, InvalidResponseError, OSError) as exc:
        raise SourceUnavailable(f"{what}: {type(exc).__name__}") from None


async def _resolve_s3(source: ModelSource, access: S3Access | None) -> Resolved:
    bucket, prefix = _parse_s3_ref(str(source.ref))
    # `models/a` must not also list `models/ab/...`: the prefix names a directory.
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    what = f"s3://{bucket}/{prefix}"
    client = _minio(source, access)

    def listing() -> list[tuple[str, int, str | None]]:
        return [
            (found.object_name, found.size or 0, found.etag)
            for found in client.list_objects(bucket, prefix=prefix or None, recursive=True)
            if found.object_name and not found.is_dir and not found.object_name.endswith("/")
        ]

    objects = await _s3_call(listing, what)
    if not objects:
        raise SourceNotFound(f"{what} holds no objects")
    files = [
        SourceFile(
            path=_safe_path(name[len(prefix) :], what),
            size=size,
            etag=etag.strip('"') if etag else None,
        )
        for name, size, etag in objects
    ]
    return _with_siblings(files)


# URLs.


def _http_client(token: str | None) -> httpx.AsyncClient:
    # identity: sizes and ranges must count the bytes as stored, not a compressed form.
    headers = {"Accept-Encoding": "identity"}
    if token:
        # httpx drops this header on redirects to another origin (a CDN, say).
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(headers=headers, follow_redirects=True, timeout=_HTTP_TIMEOUT)


async def _resolve_urls(source: ModelSource, *, token: str | None) -> Resolved:
    files: list[SourceFile] = []
    async with _http_client(token) as client:
        for url in source.urls:
            what = _display_url(url)
            try:
                response = await client.head(url)
            except httpx.TransportError as exc:
                raise SourceUnavailable(f"{what}: {type(exc).__name__}") from None
            if response.status_code != 200:
                raise _http_failure(response.status_code, what, token=token)
            length = response.headers.get("Content-Length", "")
            if not length.isdigit():
                raise SourceRefused(f"{what} does not tell its size (no Content-Length)")
            files.append(
                SourceFile(
                    path=_url_file_name(url),
                    size=int(length),
                    etag=response.headers.get("ETag"),
                )
            )
    return _with_siblings(files)


def _url_for(source: ModelSource, file: SourceFile) -> str:
    for url in source.urls:
        if _url_file_name(url) == file.path:
            return url
    raise KeyError(file.path)


# ----------------------------------------------------------------------- open_file


async def open_file(
    source: ModelSource,
    resolved: Resolved,
    file: SourceFile,
    *,
    offset: int = 0,
    token: str | None = None,
    hf_endpoint: str | None = None,
    s3: S3Access | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield `file`'s bytes from `offset` in chunks of about `CHUNK_BYTES`.

    An async generator: close early exits with `contextlib.aclosing`. A server that
    ignores the range costs the skipped bytes, but the result is still from `offset`.
    """
    async with _open(
        source, resolved, file, offset, token=token, hf_endpoint=hf_endpoint, s3=s3
    ) as (start, chunks):
        skip = offset - start
        async for chunk in chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0


@contextlib.asynccontextmanager
async def _open(
    source: ModelSource,
    resolved: Resolved,
    file: SourceFile,
    offset: int,
    *,
    token: str | None,
    hf_endpoint: str | None,
    s3: S3Access | None,
) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
    """The file's bytes from where the source started serving: `offset`, or 0 if the
    source ignored the range."""
    if not 0 <= offset <= file.size:
        raise ValueError(f"offset {offset} is outside {file.path!r} ({file.size} bytes)")
    if offset == file.size:
        # Nothing left to fetch; asking would earn a 416 from HTTP servers.
        yield offset, _no_chunks()
        return
    match source.kind:
        case SourceKind.HUGGINGFACE:
            if resolved.revision is None:
                raise ValueError("a Hugging Face file needs the resolved commit")
            url = hf_hub_url(
                str(source.ref),
                file.path,
                revision=resolved.revision,
                endpoint=_hf_api(hf_endpoint, token).endpoint,
            )
            what = f"{source.ref}/{file.path}@{resolved.revision[:12]}"
            async with _http_body(url, offset, what=what, token=token) as opened:
                yield opened
        case SourceKind.URL:
            url = _url_for(source, file)
            async with _http_body(url, offset, what=_display_url(url), token=token) as opened:
                yield opened
        case SourceKind.S3:
            async with _s3_body(source, file, offset, s3) as opened:
                yield opened
        case SourceKind.LOCAL:
            async with contextlib.aclosing(_local_chunks(source, file, offset)) as chunks:
                yield offset, chunks
        case _:
            raise ValueError(f"unsupported source kind {source.kind!r}")


async def _no_chunks() -> AsyncGenerator[bytes, None]:
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


@contextlib.asynccontextmanager
async def _http_body(
    url: str, offset: int, *, what: str, token: str | None
) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        async with _http_client(token) as client, client.stream("GET", url, headers=headers) as r:
            if r.status_code == 206:
                served = _CONTENT_RANGE_START.fullmatch(r.headers.get("Content-Range", ""))
                if served is None or int(served.group(1)) != offset:
                    raise SourceUnavailable(f"{what}: the server sent another range than asked")
                start = offset
            elif r.status_code == 200:
                start = 0
            else:
                raise _http_failure(
                    r.status_code,
                    what,
                    error_code=r.headers.get("X-Error-Code"),
                    server_message=r.headers.get("X-Error-Message"),
                    token=token,
                )
            # Raw: the bytes as stored, so sizes and ranges agree with the listing.
            yield start, r.aiter_raw(CHUNK_BYTES)
    except httpx.TransportError as exc:
        # Also what a connection cut mid-body raises while the caller iterates.
        raise SourceUnavailable(f"{what}: {type(exc).__name__}") from None


@contextlib.asynccontextmanager
async def _s3_body(
    source: ModelSource, file: SourceFile, offset: int, access: S3Access | None
) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
    bucket, prefix = _parse_s3_ref(str(source.ref))
    key = (prefix.rstrip("/") + "/" if prefix else "") + file.path
    what = f"s3://{bucket}/{key}"
    client = _minio(source, access)
    response = await _s3_call(lambda: client.get_object(bucket, key, offset=offset), what)

    async def chunks() -> AsyncGenerator[bytes, None]:
        while chunk := await _s3_call(lambda: response.read(CHUNK_BYTES), what):
            yield chunk

    try:
        async with contextlib.aclosing(chunks()) as reading:
            yield offset, reading
    finally:
        response.close()
        response.release_conn()


async def _local_chunks(
    source: ModelSource, file: SourceFile, offset: int
) -> AsyncGenerator[bytes, None]:
    def open_at() -> BinaryIO:
        try:
            handle = open(_local_path(source, file), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise SourceNotFound(f"{file.path!r} is gone from the local directory") from None
        except PermissionError:
            raise SourceRefused(f"{file.path!r} is not readable by the worker") from None
        handle.seek(offset)
        return handle

    handle = await asyncio.to_thread(open_at)
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk
    finally:
        handle.close()


# ------------------------------------------------------------------- download_file


class _PartFile:
    """The staging file of one download and the running sha256 of its bytes.

    Every chunk is flushed to the kernel before progress is reported, so an offset the
    caller heartbeats is on disk even if the worker process dies right after. Writes run
    in worker threads; the lock makes `close` on a cancelled download wait for the write
    still in flight instead of closing the file under it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._handle: BinaryIO | None = None
        self._lock = threading.Lock()

    def open(self, keep: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            existing = self.path.stat().st_size
        except FileNotFoundError:
            existing = 0
        keep = min(max(keep, 0), existing)
        handle = open(self.path, "a+b")  # noqa: SIM115 - closed by close()
        self._handle = handle
        # Bytes past the offset the caller confirmed may be from a write it never saw
        # finish; dropping them is cheaper than trusting them.
        handle.truncate(keep)
        handle.seek(0)
        while self.size < keep and (block := handle.read(min(CHUNK_BYTES, keep - self.size))):
            self._hash.update(block)
            self.size += len(block)

    def restart(self) -> None:
        with self._lock:
            self._opened().truncate(0)
            self._hash = hashlib.sha256()
            self.size = 0

    def write_all(self, chunks: list[bytes]) -> None:
        with self._lock:
            handle = self._opened()
            for chunk in chunks:
                handle.write(chunk)
                self._hash.update(chunk)
            handle.flush()
            self.size += sum(len(chunk) for chunk in chunks)

    def _opened(self) -> BinaryIO:
        if self._handle is None:
            raise ValueError(f"{self.path} is closed")
        return self._handle

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def part_name(source: ModelSource, resolved: Resolved, file: SourceFile) -> str:
    """The staging file name of `file`: stable across retries, distinct per source,
    commit and file version, and safe as a file name."""
    identity = json.dumps(
        [
            source.kind,
            source.ref,
            source.endpoint,
            resolved.revision,
            file.path,
            file.size,
            file.sha256 or file.etag,
        ]
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(file.path).name)[-80:]
    return f"{digest}-{readable}.part"


async def download_file(
    source: ModelSource,
    resolved: Resolved,
    file: SourceFile,
    store: ObjectStore,
    *,
    staging_dir: Path,
    resume_offset: int = 0,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = PROGRESS_EVERY_BYTES,
    token: str | None = None,
    hf_endpoint: str | None = None,
    s3: S3Access | None = None,
) -> StoredFile:
    """Download `file` into `store` under `content_key(sha256)`; return where it went.

    Bytes go to `staging_dir/<part_name>`; a retry passes the last progress value as
    `resume_offset` and only the rest is fetched. `on_progress(bytes_on_disk)` is called
    at least every `progress_every` bytes and once at the end. The size, and the sha256
    when the source listed one, are verified before anything is stored; a mismatch
    raises `IntegrityError` and drops the staging file. Content the store already holds
    is not uploaded again. One download per file and staging directory at a time.
    """
    part = _PartFile(staging_dir / part_name(source, resolved, file))
    await asyncio.to_thread(part.open, resume_offset)
    try:
        await _fetch_into(
            part,
            source,
            resolved,
            file,
            on_progress,
            progress_every,
            token=token,
            hf_endpoint=hf_endpoint,
            s3=s3,
        )
        _verify(part, file)
    except IntegrityError:
        # A retry must not resume from bytes that are known to be wrong.
        part.discard()
        raise
    finally:
        part.close()
    digest = part.hexdigest()
    key = content_key(digest)
    existing = await store.stat(key)
    reused = existing is not None and existing.size == part.size
    if reused:
        await asyncio.to_thread(part.path.unlink, missing_ok=True)
    else:
        # The file store moves the finished part into place (no second copy).
        await store.adopt_file(key, part.path, etag=f"sha256-{digest}")
    return StoredFile(path=file.path, size=part.size, sha256=digest, key=key, reused=reused)


def _verify(part: _PartFile, file: SourceFile) -> None:
    if part.size != file.size:
        # Transports raise on a body cut short, so a clean end at another size means
        # the file changed since it was listed; resuming cannot fix that.
        raise IntegrityError(
            f"{file.path!r}: received {part.size} bytes, the source listed {file.size}"
        )
    digest = part.hexdigest()
    if file.sha256 is not None and digest != file.sha256.lower():
        raise IntegrityError(
            f"{file.path!r}: sha256 {digest} differs from the listed {file.sha256}"
        )


async def _fetch_into(
    part: _PartFile,
    source: ModelSource,
    resolved: Resolved,
    file: SourceFile,
    on_progress: Callable[[int], None] | None,
    progress_every: int,
    *,
    token: str | None,
    hf_endpoint: str | None,
    s3: S3Access | None,
) -> None:
    async with _open(
        source, resolved, file, part.size, token=token, hf_endpoint=hf_endpoint, s3=s3
    ) as (start, chunks):
        if start != part.size:
            # The server ignored the range and sends everything: start over with it.
            await asyncio.to_thread(part.restart)
        reported = part.size
        received = part.size
        batch: list[bytes] = []
        batched = 0
        writing: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > file.size:
                    raise IntegrityError(f"{file.path!r}: more bytes than the listed {file.size}")
                batch.append(chunk)
                batched += len(chunk)
                # Progress is reported per written batch: batches no larger than the
                # progress step keep it as fine as the caller asked.
                if batched < min(WRITE_BATCH_BYTES, progress_every):
                    continue
                # One batch is written (and hashed) in a thread while the next arrives.
                if writing is not None:
                    await writing
                    # Only what a finished write flushed is reported.
                    if on_progress is not None and part.size - reported >= progress_every:
                        on_progress(part.size)
                        reported = part.size
                writing = asyncio.ensure_future(asyncio.to_thread(part.write_all, batch))
                batch, batched = [], 0
            if writing is not None:
                await writing
                writing = None
            await asyncio.to_thread(part.write_all, batch)
        except BaseException:
            if writing is not None:
                # Cancelled or failed mid-way: let the write in flight land (or fail)
                # before the part file is closed, and report what it flushed, so a
                # retry resumes after it.
                await asyncio.gather(writing, return_exceptions=True)
                if on_progress is not None and part.size > reported:
                    on_progress(part.size)
            raise
    if on_progress is not None:
        on_progress(part.size)
