"""`s3://` references and the object-store client, against a real S3-API server process (moto's
standalone server on a free port; nothing is patched in-process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import S3Server, s3_server, s3_unavailable

from fd2_core.data.object_store import ObjectStore, StoreError
from fd2_core.data.object_uris import ObjectUri, ObjectUriError, allowed_by, parse_object_uri


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    reason = s3_unavailable()
    if reason:
        pytest.skip(reason)
    with s3_server(tmp_path_factory.mktemp("s3")) as running:
        client = running.client()
        client.create_bucket(Bucket="birds")
        for name in ("train/wren/0.png", "train/wren/1.png", "train/finch/0.png", "test/wren/0.png"):
            client.put_object(Bucket="birds", Key=name, Body=name.encode())
        client.put_object(Bucket="birds", Key="train/", Body=b"")  # a console's folder marker
        yield running


@pytest.fixture
def store(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return ObjectStore()  # the endpoint and credentials from the standard AWS_* chain


@pytest.mark.parametrize(("text", "words"), [
    ("https://birds/x", "not an s3:// reference"), ("s3://Birds/x", "not a valid bucket name"),
    ("s3://ab/x", "not a valid bucket name"), ("s3://10.0.0.1/x", "not a valid bucket name"),
    ("s3://birds/a//b", "empty, '.' or '..' segment"), ("s3://birds/a/../b", "empty, '.' or '..' segment"),
    ("s3://birds/a\\b", "backslash"), ("s3://birds/" + "k" * 1025, "1024 bytes"),
])
def test_references_s3_would_read_another_way_are_refused(text: str, words: str) -> None:
    with pytest.raises(ObjectUriError, match=words):
        parse_object_uri(text)


def test_the_allow_list_matches_prefixes_as_text() -> None:
    allowed = [parse_object_uri("s3://birds/teams/vision/"), parse_object_uri("s3://cars/set")]
    assert allowed_by(parse_object_uri("s3://birds/teams/vision/cub/"), allowed)
    assert not allowed_by(parse_object_uri("s3://birds/teams/visionary/"), allowed)
    assert allowed_by(parse_object_uri("s3://cars/set/train/a.png"), allowed)
    assert not allowed_by(parse_object_uri("s3://cars/settings/"), allowed)  # "set" allows set/…, not settings
    assert not allowed_by(parse_object_uri("s3://birds/"), allowed) and not allowed_by(ObjectUri("x" * 3), [])
    assert str(parse_object_uri("s3://birds/train/")) == "s3://birds/train/"


def test_a_prefix_lists_its_objects_with_sizes_and_etags(store: ObjectStore) -> None:
    listed = store.list(parse_object_uri("s3://birds/train/"), limit=10)
    assert [o.key for o in listed] == ["train/finch/0.png", "train/wren/0.png", "train/wren/1.png"]
    assert all(o.size == len(o.key) and len(o.etag) == 32 for o in listed)  # the folder marker is left out
    assert store.read(parse_object_uri("s3://birds/train/wren/1.png"), listed[2].etag) == b"train/wren/1.png"


def test_a_listing_stops_past_its_limit(store: ObjectStore) -> None:
    with pytest.raises(StoreError) as refused:
        store.list(parse_object_uri("s3://birds/"), limit=3)
    assert refused.value.code == "too_many_objects" and refused.value.details["limit"] == 3


def test_the_stores_refusals_say_their_cause(store: ObjectStore, server: S3Server) -> None:
    with pytest.raises(StoreError) as missing_bucket:
        store.list(parse_object_uri("s3://no-such-bucket/x/"), limit=10)
    assert missing_bucket.value.code == "no_such_bucket" and "'no-such-bucket'" in missing_bucket.value.message
    with pytest.raises(StoreError) as missing_key:
        store.head(parse_object_uri("s3://birds/train/wren/9.png"))
    assert missing_key.value.code == "no_such_key"
    before = store.head(parse_object_uri("s3://birds/test/wren/0.png"))
    server.client().put_object(Bucket="birds", Key="test/wren/0.png", Body=b"another image")
    with pytest.raises(StoreError) as changed:
        store.read(parse_object_uri("s3://birds/test/wren/0.png"), before.etag)
    assert changed.value.code == "object_changed" and "submit the job again" in changed.value.message


def test_an_unreachable_store_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from service_harness import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = ObjectStore(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setattr("fd2_core.data.object_store.MAX_ATTEMPTS", 1)
    with pytest.raises(StoreError) as unreachable:
        store.list(parse_object_uri("s3://birds/"), limit=10)
    assert unreachable.value.code == "store_unreachable"


def test_importing_the_store_loads_no_client_library() -> None:
    """The API imports these modules at start; boto3 (about 0.1 s) loads only when a store is used."""
    code = ("import sys, fd2_core.data.object_store, fd2_core.data.object_uris; "
            "print('boto3' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], env={**os.environ})
    assert out.stdout.split() == ["False", "False"]


def _png(shade: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("layout_name", ["imagefolder", "flat"])
def test_a_prefix_is_laid_out_as_the_same_files_on_disk_would_be(store: ObjectStore, server: S3Server,
                                                                  tmp_path: Path, layout_name: str) -> None:
    """The listing goes through the one layout scanner: classes, splits, the carved test share and the
    skipped files are those of the same tree uploaded as files; no object is downloaded."""
    from fd2_core.data.layout import scan_source
    from fd2_core.data.limits import DataLimits
    from fd2_core.data.object_layout import scan_object_prefix

    top = "train/" if layout_name == "imagefolder" else ""
    tree = {f"{top}{name}/{i}.png": _png(i * 20 + len(name)) for name in ("wren", "finch", "tit") for i in range(5)}
    tree[f"{top}notes.txt"] = b"not an image"
    tree[f"{top}wren/sub/5.png"] = _png(200)
    client = server.client()
    bucket = f"layout-{layout_name}"
    client.create_bucket(Bucket=bucket)
    for key, body in tree.items():
        client.put_object(Bucket=bucket, Key=f"sets/birds/{key}", Body=body)
        (tmp_path / "disk" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "disk" / key).write_bytes(body)
    listed = scan_object_prefix(store, parse_object_uri(f"s3://{bucket}/sets/birds"), test_fraction=0.2, seed=3,
                                limits=DataLimits())
    on_disk = scan_source(tmp_path / "disk", test_fraction=0.2, seed=3)
    assert listed.layout.classes == on_disk.classes == ["finch", "tit", "wren"]
    assert [(i.path.as_posix(), i.label, i.split) for i in listed.layout.items] == [
        (i.path.relative_to(on_disk.root).as_posix(), i.label, i.split) for i in on_disk.items]
    assert [e.as_dict() for e in listed.layout.errors] == [e.as_dict() for e in on_disk.errors]
    assert [o.key for o in listed.objects] == [f"sets/birds/{i.path.as_posix()}" for i in listed.layout.items]
    assert listed.total_bytes == sum(len(tree[i.path.as_posix()]) for i in listed.layout.items)
    with pytest.raises(StoreError, match="more than 10 objects"):
        scan_object_prefix(store, parse_object_uri(f"s3://{bucket}/sets/"), test_fraction=0.2, seed=3,
                           limits=DataLimits(max_files=10))


@pytest.fixture
def fetch_bucket(server: S3Server) -> tuple[str, list]:
    from fd2_core.data.object_store import StoredObject

    client = server.client()
    bucket = "fetch-me"
    client.create_bucket(Bucket=bucket)
    objects = []
    for i in range(12):
        body = bytes([i]) * (1000 + i)
        client.put_object(Bucket=bucket, Key=f"set/c{i % 3}/{i}.png", Body=body)
        etag = client.head_object(Bucket=bucket, Key=f"set/c{i % 3}/{i}.png")["ETag"].strip('"')
        objects.append(StoredObject(f"set/c{i % 3}/{i}.png", len(body), etag))
    return bucket, objects


def test_objects_are_fetched_through_the_cache(store: ObjectStore, server: S3Server, tmp_path: Path,
                                               fetch_bucket: tuple[str, list]) -> None:
    from fd2_core.data.object_fetch import ObjectCache, fetch_objects

    bucket, objects = fetch_bucket
    relative = [o.key.removeprefix("set/") for o in objects]
    cache = ObjectCache(tmp_path / "cache", max_bytes=10**6)
    seen = []
    first = fetch_objects(store, bucket, objects, cache, tmp_path / "job1", relative, workers=4,
                          on_progress=seen.append)
    assert (first.done, first.cached, first.bytes_done) == (12, 0, sum(o.size for o in objects))
    assert [p.done for p in seen] == list(range(1, 13)) and "fetching 12 / 12 objects" in seen[-1].message()
    assert all((tmp_path / "job1" / r).read_bytes() == bytes([i]) * (1000 + i) for i, r in enumerate(relative))
    for o in objects:  # gone from the store: a second job is served from the cache alone
        server.client().delete_object(Bucket=bucket, Key=o.key)
    second = fetch_objects(store, bucket, objects, cache, tmp_path / "job2", relative, workers=4)
    assert (second.done, second.cached) == (12, 12)
    stale = tmp_path / "job2" / relative[0]
    stale.unlink()
    stale.write_bytes(b"a stale copy")  # another file where a retried fetch places the entry
    again = fetch_objects(store, bucket, objects, cache, tmp_path / "job2", relative, workers=4)
    assert again.done == 12 and (tmp_path / "job2" / relative[0]).read_bytes() == bytes([0]) * 1000
    assert all((tmp_path / "job2" / r).read_bytes() == bytes([i]) * (1000 + i) for i, r in enumerate(relative))


def test_a_killed_fetchs_partial_file_never_counts_and_is_removed_once_stale(tmp_path: Path) -> None:
    from fd2_core.data.object_fetch import PARTIAL_STALE_S, ObjectCache

    cache = ObjectCache(tmp_path / "cache", max_bytes=10**6)
    (cache.folder / "ab").mkdir()
    fresh, stale = cache.folder / "ab" / "x.1.partial", cache.folder / "ab" / "y.2.partial"
    fresh.write_bytes(b"in flight")
    stale.write_bytes(b"killed mid-download")
    old = time.time() - PARTIAL_STALE_S - 1
    os.utime(stale, (old, old))
    assert cache.entries() == [] and fresh.exists() and not stale.exists()


def test_a_changed_object_is_reported_never_mixed(store: ObjectStore, server: S3Server, tmp_path: Path,
                                                  fetch_bucket: tuple[str, list]) -> None:
    from fd2_core.data.object_fetch import ObjectCache, fetch_objects

    bucket, objects = fetch_bucket
    server.client().put_object(Bucket=bucket, Key=objects[5].key, Body=b"replaced after admission")
    with pytest.raises(StoreError) as changed:
        fetch_objects(store, bucket, objects, ObjectCache(tmp_path / "cache", 10**6), tmp_path / "job",
                      [o.key for o in objects], workers=2)
    assert changed.value.code == "object_changed" and objects[5].key in changed.value.message


def test_the_cache_evicts_the_least_recently_used_and_a_stop_is_prompt(store: ObjectStore, tmp_path: Path,
                                                                        fetch_bucket: tuple[str, list]) -> None:
    from fd2_core.data.object_fetch import FetchStopped, ObjectCache, fetch_objects

    bucket, objects = fetch_bucket
    cache = ObjectCache(tmp_path / "cache", max_bytes=5000)  # room for four of the twelve
    fetch_objects(store, bucket, objects, cache, tmp_path / "job", [o.key for o in objects], workers=1)
    kept = cache.entries()
    assert len(kept) <= 4 and sum(size for _, size, _ in kept) <= 5000
    parallel = ObjectCache(tmp_path / "parallel", max_bytes=5000)  # eight downloads at once stay within the cap
    fetch_objects(store, bucket, objects, parallel, tmp_path / "job-p", [o.key for o in objects], workers=8)
    assert sum(size for _, size, _ in parallel.entries()) <= 5000
    with pytest.raises(StoreError, match="cannot hold"):
        ObjectCache(tmp_path / "tiny", max_bytes=10).make_room(11)
    in_flight = ObjectCache(tmp_path / "flight", max_bytes=100)
    with pytest.raises(StoreError, match="cannot hold"):
        in_flight.make_room(101)  # more than the cap: refused at once, nothing to wait for
    calls = []
    resumable = ObjectCache(tmp_path / "c2", 10**6)
    with pytest.raises(FetchStopped):
        fetch_objects(store, bucket, objects, resumable, tmp_path / "job2", [o.key for o in objects], workers=1,
                      should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(list((tmp_path / "job2").rglob("*.png"))) == 3
    again = fetch_objects(store, bucket, objects, resumable, tmp_path / "job3", [o.key for o in objects])
    assert (again.done, again.cached) == (12, 3)  # the stopped fetch's objects come from the cache
