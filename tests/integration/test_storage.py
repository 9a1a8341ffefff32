"""The object store contract: the file and S3 backends pass the same suite.

S3 runs against a local moto server standing in for MinIO/S3 (`tests/fixtures/s3.py`),
with the smallest part size S3 allows (5 MiB) so that streamed uploads of ~12 MiB really
go through multipart upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.core.config import Settings
from control_plane.core.errors import DependencyUnavailable
from control_plane.core.storage import (
    DEFAULT_CONTENT_TYPE,
    FileObjectStore,
    HashingReader,
    ObjectNotFound,
    ObjectStore,
    S3ObjectStore,
    content_key,
    create_object_store,
)
from tests.fixtures.s3 import S3Server

MiB = 1024 * 1024
PART_SIZE = 5 * MiB
LARGE_SIZE = 12 * MiB + 12_345  # three parts, the last one short
CHUNK_SIZE = 256 * 1024

ESCAPING_KEYS = [
    "../outside",
    "a/../../outside",
    "/etc/passwd",
    "a//b",
    "a/",
    "",
    "a/./b",
    "a\\..\\b",
    "a/\x00b",
]


async def generated(size: int, *, seed: int = 7, chunk: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """`size` pseudo-random bytes, produced chunk by chunk as a download would."""
    rng = random.Random(seed)
    sent = 0
    while sent < size:
        piece = rng.randbytes(min(chunk, size - sent))
        sent += len(piece)
        yield piece


async def digest_of(stream: AsyncIterator[bytes]) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    async for chunk in stream:
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()


async def expected_digest(size: int, *, seed: int = 7) -> tuple[int, str]:
    return await digest_of(generated(size, seed=seed))


async def failing_after(size: int) -> AsyncIterator[bytes]:
    async for chunk in generated(size):
        yield chunk
    raise ConnectionResetError("source went away")


async def stalling_after(size: int) -> AsyncIterator[bytes]:
    async for chunk in generated(size):
        yield chunk
    await asyncio.Event().wait()  # a source that hangs until the caller gives up
    yield b""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_store(server: S3Server, bucket: str, **options: object) -> S3ObjectStore:
    return S3ObjectStore(
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        bucket=bucket,
        secure=False,
        part_size=PART_SIZE,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    backend: ObjectStore
    if request.param == "file":
        backend = FileObjectStore(tmp_path / "objects")
    else:
        backend = s3_store(
            request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        )
    await backend.ensure_ready()
    try:
        yield backend
    finally:
        await backend.close()


class TestObjectStoreContract:
    async def test_bytes_round_trip(self, store: ObjectStore) -> None:
        await store.put_bytes("models/m1/config.json", b'{"layers": 32}')

        assert await store.get_bytes("models/m1/config.json") == b'{"layers": 32}'

    async def test_put_returns_what_stat_reports(self, store: ObjectStore) -> None:
        written = await store.put_bytes("a/b.txt", b"hello", content_type="text/plain")

        assert written == await store.stat("a/b.txt")
        assert written.size == 5
        assert written.etag == hashlib.md5(b"hello").hexdigest()

    async def test_streamed_object_larger_than_a_part_round_trips(self, store: ObjectStore) -> None:
        written = await store.put_stream("blobs/large.bin", generated(LARGE_SIZE))

        assert written.size == LARGE_SIZE
        assert await digest_of(store.get_stream("blobs/large.bin")) == await expected_digest(
            LARGE_SIZE
        )

    async def test_local_file_uploads_by_path(self, store: ObjectStore, tmp_path: Path) -> None:
        source = tmp_path / "weights.safetensors"
        source.write_bytes(random.Random(3).randbytes(6 * MiB))

        written = await store.put_stream("models/m1/weights.safetensors", source)

        assert written.size == 6 * MiB
        assert await store.get_bytes("models/m1/weights.safetensors") == source.read_bytes()

    async def test_hashing_reader_gives_the_content_address_of_what_was_stored(
        self, store: ObjectStore
    ) -> None:
        reader = HashingReader(generated(3 * MiB))

        await store.put_stream("staging/upload-1", reader)

        assert (reader.size, reader.sha256_hex) == await expected_digest(3 * MiB)
        key = content_key(reader.sha256_hex)
        assert key.endswith(reader.sha256_hex)

    async def test_empty_object_round_trips(self, store: ObjectStore) -> None:
        written = await store.put_bytes("empty", b"")

        assert written.size == 0
        assert await store.get_bytes("empty") == b""

    async def test_range_read_with_offset_and_length(self, store: ObjectStore) -> None:
        data = random.Random(1).randbytes(3 * MiB)
        await store.put_bytes("ranged", data)

        # Crosses the 1 MiB boundary between the chunks get_stream yields.
        part = await store.get_bytes("ranged", offset=MiB - 10, length=MiB + 20)

        assert part == data[MiB - 10 : 2 * MiB + 10]

    async def test_range_read_from_offset_to_end(self, store: ObjectStore) -> None:
        await store.put_bytes("ranged", b"0123456789")

        assert await store.get_bytes("ranged", offset=6) == b"6789"

    async def test_range_reaching_past_the_end_is_cut_at_the_end(self, store: ObjectStore) -> None:
        await store.put_bytes("ranged", b"0123456789")

        assert await store.get_bytes("ranged", offset=8, length=100) == b"89"
        assert await store.get_bytes("ranged", offset=10) == b""
        assert await store.get_bytes("ranged", offset=50) == b""
        assert await store.get_bytes("ranged", offset=2, length=0) == b""

    async def test_negative_range_is_rejected(self, store: ObjectStore) -> None:
        await store.put_bytes("ranged", b"0123456789")

        with pytest.raises(ValueError, match="offset"):
            await store.get_bytes("ranged", offset=-1)

    async def test_stat_of_missing_key_is_none(self, store: ObjectStore) -> None:
        assert await store.stat("no/such/key") is None
        assert await store.exists("no/such/key") is False

    async def test_get_of_missing_key_raises_object_not_found(self, store: ObjectStore) -> None:
        with pytest.raises(ObjectNotFound) as raised:
            await store.get_bytes("no/such/key")

        assert raised.value.key == "no/such/key"
        assert isinstance(raised.value, KeyError)

    async def test_range_read_of_missing_key_raises_object_not_found(
        self, store: ObjectStore
    ) -> None:
        with pytest.raises(ObjectNotFound):
            await store.get_bytes("no/such/key", offset=4, length=0)

    async def test_a_key_that_is_only_a_prefix_of_objects_is_not_an_object(
        self, store: ObjectStore
    ) -> None:
        await store.put_bytes("dir/file", b"x")

        assert await store.stat("dir") is None
        with pytest.raises(ObjectNotFound):
            await store.get_bytes("dir")

    async def test_delete_removes_the_object(self, store: ObjectStore) -> None:
        await store.put_bytes("gone/soon", b"x")

        await store.delete("gone/soon")

        assert await store.exists("gone/soon") is False

    async def test_delete_of_missing_key_is_not_an_error(self, store: ObjectStore) -> None:
        await store.delete("never/written")
        await store.delete("never/written")

    async def test_delete_prefix_removes_only_keys_under_it(self, store: ObjectStore) -> None:
        for key in ("runs/1/a", "runs/1/b/c", "runs/10/a", "runs/2/a"):
            await store.put_bytes(key, b"x")

        deleted = await store.delete_prefix("runs/1/")

        assert deleted == 2
        assert [info.key async for info in store.list("runs/")] == ["runs/10/a", "runs/2/a"]

    async def test_delete_prefix_matches_characters_like_s3(self, store: ObjectStore) -> None:
        for key in ("runs/1/a", "runs/10/a", "runs/2/a"):
            await store.put_bytes(key, b"x")

        assert await store.delete_prefix("runs/1") == 2
        assert [info.key async for info in store.list("")] == ["runs/2/a"]

    async def test_delete_prefix_refuses_an_empty_prefix(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError, match="non-empty prefix"):
            await store.delete_prefix("")

    async def test_list_yields_keys_under_prefix_sorted(self, store: ObjectStore) -> None:
        keys = [
            "models/xa",
            "models/x/sub/c.bin",
            "other/z",
            "models/x-y/b.bin",
            "models/x/a.bin",
            "models/x/.gitattributes",
        ]
        for key in keys:
            await store.put_bytes(key, b"x")

        listed = [info.key async for info in store.list("models/")]

        assert listed == [
            "models/x-y/b.bin",
            "models/x/.gitattributes",
            "models/x/a.bin",
            "models/x/sub/c.bin",
            "models/xa",
        ]

    async def test_list_with_a_partial_segment_prefix(self, store: ObjectStore) -> None:
        for key in ("models/x/a.bin", "models/x-y/b.bin", "models/y/c.bin"):
            await store.put_bytes(key, b"x")

        listed = [info.key async for info in store.list("models/x")]

        assert listed == ["models/x-y/b.bin", "models/x/a.bin"]

    async def test_list_of_an_empty_prefix_is_empty(self, store: ObjectStore) -> None:
        assert [info async for info in store.list("nothing/here/")] == []

    async def test_list_entries_carry_size_and_etag(self, store: ObjectStore) -> None:
        written = await store.put_bytes("sized/one", b"12345", metadata={"a": "b"})

        [listed] = [info async for info in store.list("sized/")]

        assert (listed.key, listed.size, listed.etag) == ("sized/one", 5, written.etag)
        assert listed.last_modified == written.last_modified
        assert (listed.content_type, dict(listed.metadata)) == (None, {})

    async def test_metadata_and_content_type_are_preserved(self, store: ObjectStore) -> None:
        await store.put_stream(
            "models/m1/card.json",
            generated(1000),
            content_type="application/json",
            metadata={"Source": "huggingface", "revision": "0123abcd"},
        )

        info = await store.stat("models/m1/card.json")

        assert info is not None
        assert info.content_type == "application/json"
        assert dict(info.metadata) == {"source": "huggingface", "revision": "0123abcd"}
        assert info.last_modified.tzinfo is not None

    async def test_content_type_defaults_to_octet_stream(self, store: ObjectStore) -> None:
        await store.put_bytes("plain", b"x")

        info = await store.stat("plain")

        assert info is not None
        assert info.content_type == DEFAULT_CONTENT_TYPE
        assert dict(info.metadata) == {}

    @pytest.mark.parametrize(
        "metadata",
        [{"with space": "x"}, {"ok": "non-ascii é"}, {"ok": " padded"}, {"a": "x" * 3000}],
    )
    async def test_metadata_that_cannot_round_trip_is_rejected(
        self, store: ObjectStore, metadata: dict[str, str]
    ) -> None:
        with pytest.raises(ValueError, match="metadata"):
            await store.put_bytes("meta", b"x", metadata=metadata)

    async def test_overwriting_a_key_replaces_content_and_metadata(
        self, store: ObjectStore
    ) -> None:
        await store.put_bytes("same", b"first version", metadata={"v": "1"})

        await store.put_bytes("same", b"second", content_type="text/plain", metadata={"v": "2"})

        info = await store.stat("same")
        assert info is not None
        assert (info.size, info.content_type, dict(info.metadata)) == (6, "text/plain", {"v": "2"})
        assert await store.get_bytes("same") == b"second"

    async def test_a_stream_that_fails_midway_stores_nothing(self, store: ObjectStore) -> None:
        await store.put_bytes("resumable", b"previous")

        with pytest.raises(ConnectionResetError):
            await store.put_stream("resumable", failing_after(6 * MiB))

        assert await store.get_bytes("resumable") == b"previous"
        assert [info.key async for info in store.list("")] == ["resumable"]

    async def test_a_cancelled_put_stores_nothing(self, store: ObjectStore) -> None:
        upload = asyncio.create_task(store.put_stream("cancelled", stalling_after(6 * MiB)))
        await asyncio.sleep(0.2)

        upload.cancel()

        with pytest.raises(asyncio.CancelledError):
            await upload
        assert await store.exists("cancelled") is False

    @pytest.mark.parametrize("key", ESCAPING_KEYS)
    async def test_keys_escaping_the_root_are_rejected(self, store: ObjectStore, key: str) -> None:
        with pytest.raises(ValueError, match="object key"):
            await store.put_bytes(key, b"x")
        with pytest.raises(ValueError, match="object key"):
            await store.stat(key)
        with pytest.raises(ValueError, match="object key"):
            await store.delete(key)

    async def test_prefixes_escaping_the_root_are_rejected(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError, match="prefix"):
            [info async for info in store.list("../")]
        with pytest.raises(ValueError, match="prefix"):
            await store.delete_prefix("/etc/")

    async def test_check_passes_when_ready(self, store: ObjectStore) -> None:
        await store.check()

    async def test_ensure_ready_can_run_again(self, store: ObjectStore) -> None:
        await store.put_bytes("kept", b"x")

        await store.ensure_ready()

        assert await store.get_bytes("kept") == b"x"


class TestContentKey:
    def test_fans_out_on_the_first_two_bytes(self) -> None:
        digest = hashlib.sha256(b"weights").hexdigest()

        assert content_key(digest) == f"blobs/sha256/{digest[:2]}/{digest[2:4]}/{digest}"

    def test_prefix_is_configurable(self) -> None:
        digest = "ab" * 32

        assert content_key(digest, prefix="datasets/blobs") == (
            f"datasets/blobs/sha256/ab/ab/{digest}"
        )

    @pytest.mark.parametrize(
        "digest", ["AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, "", "../" + "a" * 61]
    )
    def test_rejects_anything_but_64_lowercase_hex_characters(self, digest: str) -> None:
        with pytest.raises(ValueError, match="64 lowercase hexadecimal"):
            content_key(digest)

    def test_rejects_a_prefix_escaping_the_root(self) -> None:
        with pytest.raises(ValueError, match="object key"):
            content_key("ab" * 32, prefix="../blobs")


class TestHashingReader:
    async def test_digest_is_refused_before_the_stream_ends(self) -> None:
        reader = HashingReader(generated(1000))

        with pytest.raises(RuntimeError, match="not been read to the end"):
            _ = reader.sha256_hex

    async def test_passes_chunks_through_unchanged(self) -> None:
        reader = HashingReader(generated(300_000))

        assert await digest_of(aiter(reader)) == (reader.size, reader.sha256_hex)
        assert reader.size == 300_000


class TestS3ObjectStore:
    """S3-only behaviour, against the local moto server standing in for MinIO/S3."""

    async def test_check_raises_dependency_unavailable_when_the_endpoint_is_unreachable(
        self,
    ) -> None:
        store = S3ObjectStore(
            endpoint=f"127.0.0.1:{closed_port()}",
            access_key="a",
            secret_key="b",
            bucket="any",
            secure=False,
        )
        started = time.monotonic()

        with pytest.raises(DependencyUnavailable) as raised:
            await store.check()

        assert raised.value.dependency == "object_store"
        assert raised.value.status == 503
        assert time.monotonic() - started < 3  # a probe does not retry for minutes
        await store.close()

    async def test_check_raises_dependency_unavailable_when_the_bucket_is_missing(
        self, s3_server: S3Server, s3_bucket: str
    ) -> None:
        store = s3_store(s3_server, s3_bucket)

        with pytest.raises(DependencyUnavailable, match="does not exist"):
            await store.check()
        await store.close()

    async def test_stream_of_unknown_length_uploads_in_parts(
        self, s3_server: S3Server, s3_bucket: str
    ) -> None:
        async with s3_store(s3_server, s3_bucket) as store:
            await store.ensure_ready()

            written = await store.put_stream("large", generated(LARGE_SIZE))

        # S3 gives multipart objects an etag of "<md5 of part md5s>-<part count>".
        assert written.etag.endswith("-3")

    def test_endpoint_with_a_scheme_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="without a scheme"):
            S3ObjectStore(endpoint="http://minio:9000", access_key="a", secret_key="b", bucket="c")

    def test_part_size_below_the_s3_minimum_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="part_size"):
            S3ObjectStore(
                endpoint="minio:9000", access_key="a", secret_key="b", bucket="c", part_size=MiB
            )


class TestFileObjectStore:
    async def test_objects_are_plain_files_other_processes_can_open(self, tmp_path: Path) -> None:
        store = FileObjectStore(tmp_path)
        await store.ensure_ready()

        await store.put_bytes("models/m1/config.json", b"{}")

        assert store.path_for("models/m1/config.json").read_bytes() == b"{}"

    async def test_writes_leave_no_temporary_files(self, tmp_path: Path) -> None:
        store = FileObjectStore(tmp_path)
        await store.ensure_ready()

        await store.put_stream("a", generated(2 * MiB))
        await store.put_bytes("b", b"x")
        with pytest.raises(ConnectionResetError):
            await store.put_stream("c", failing_after(MiB))

        assert list((tmp_path / "tmp").iterdir()) == []

    async def test_delete_prunes_emptied_directories(self, tmp_path: Path) -> None:
        store = FileObjectStore(tmp_path)
        await store.put_bytes("deep/er/still/object", b"x")

        await store.delete("deep/er/still/object")

        assert list((tmp_path / "data").iterdir()) == []

    async def test_an_object_cannot_sit_where_a_directory_of_objects_is(
        self, tmp_path: Path
    ) -> None:
        store = FileObjectStore(tmp_path)
        await store.put_bytes("dir/file", b"x")

        with pytest.raises(ValueError, match="conflicts"):
            await store.put_bytes("dir", b"y")
        with pytest.raises(ValueError, match="conflicts"):
            await store.put_bytes("dir/file/below", b"z")

    async def test_check_raises_dependency_unavailable_before_ensure_ready(
        self, tmp_path: Path
    ) -> None:
        store = FileObjectStore(tmp_path / "missing")

        with pytest.raises(DependencyUnavailable) as raised:
            await store.check()

        assert raised.value.dependency == "object_store"


class TestCreateObjectStore:
    def test_file_backend_lives_under_the_objects_dir(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path)

        store = create_object_store(settings)

        assert isinstance(store, FileObjectStore)
        assert store.root == tmp_path / "objects"

    def test_s3_backend_uses_the_s3_settings(self) -> None:
        settings = Settings.model_validate(
            {
                "storage": {"backend": "s3", "multipart_chunk_bytes": 8 * MiB},
                "s3": {"endpoint": "minio:9000", "bucket": "models", "secure": False},
            }
        )

        store = create_object_store(settings)

        assert isinstance(store, S3ObjectStore)
        assert (store.endpoint, store.bucket, store.part_size) == ("minio:9000", "models", 8 * MiB)
