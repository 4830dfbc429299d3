"""The Store contract, run on both backends, plus S3-only behaviour against a real SeaweedFS."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from storage.store import (
    MIB,
    AccessDeniedError,
    InvalidKeyError,
    LocalStore,
    NotFoundError,
    ObjectTooLargeError,
    S3Store,
    StoreError,
    StoreUnavailableError,
    UnsafePathError,
    open_store,
)


def test_put_get_roundtrip_and_overwrite(store):
    store.put_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    store.put_bytes("a/b/c.bin", b"second")
    assert store.get_bytes("a/b/c.bin") == b"second"


def test_missing_key_raises_not_found_naming_the_key(store):
    with pytest.raises(NotFoundError, match="nope/x.jpg") as info:
        store.get_bytes("nope/x.jpg")
    assert info.value.key == "nope/x.jpg"


def test_list_is_sorted_relative_and_prefix_filtered(store):
    for key in ["b/2", "a-b", "a/1", "a/0", "ab", "b/10"]:
        store.put_bytes(key, key.encode())
    # Byte order as S3 lists it: "-" (0x2d) sorts before "/" (0x2f) before letters.
    assert list(store.list()) == ["a-b", "a/0", "a/1", "ab", "b/10", "b/2"]
    assert list(store.list("a/")) == ["a/0", "a/1"]
    assert list(store.list("a")) == ["a-b", "a/0", "a/1", "ab"]
    assert list(store.list("b/1")) == ["b/10"]
    assert list(store.list("zzz/")) == []


def test_list_objects_reports_sizes_and_change_tokens(store):
    store.put_bytes("x/one", b"1")
    store.put_bytes("x/three", b"333")
    infos = list(store.list_objects("x/"))
    assert [(i.key, i.size) for i in infos] == [("x/one", 1), ("x/three", 3)]
    assert all(i.etag for i in infos)


def test_exists_and_delete_is_idempotent(store):
    assert not store.exists("k/v")
    store.put_bytes("k/v", b"1")
    assert store.exists("k/v")
    assert not store.exists("k")  # a "folder" is not an object
    store.delete("k/v")
    store.delete("k/v")
    assert not store.exists("k/v")
    assert list(store.list()) == []


def test_create_if_absent_only_first_writer_wins(store):
    assert store.create_if_absent("locks/run-1", b"first") is True
    assert store.create_if_absent("locks/run-1", b"second") is False
    assert store.get_bytes("locks/run-1") == b"first"


def test_create_if_absent_concurrent_callers_exactly_one_wins(store):
    barrier = threading.Barrier(8)

    def race(i: int) -> bool:
        barrier.wait()
        return store.create_if_absent("locks/race", f"writer-{i}".encode())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(race, range(8)))
    assert sum(results) == 1
    winner = results.index(True)
    assert store.get_bytes("locks/race") == f"writer-{winner}".encode()


def test_presigned_url_is_readable_without_credentials(store):
    store.put_bytes("review/img.png", b"PNGDATA", content_type="image/png")
    url = store.presigned_url("review/img.png", expires_s=60)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"PNGDATA"


def test_uri_for_reopens_to_the_same_object(store):
    store.put_bytes("deep/er/file.txt", b"here")
    uri = store.uri_for("deep/er/file.txt")
    parent, name = uri.rsplit("/", 1)
    assert open_store(parent).get_bytes(name) == b"here"
    assert open_store(store.uri).get_bytes("deep/er/file.txt") == b"here"


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs", "a\\b", "a/\x00b", "a/\nb", "", "a//b", "a/./b", "a/"]
)
def test_bad_keys_are_refused_before_any_io(store, key):
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidKeyError):
        store.get_bytes(key)


def test_local_store_leaves_no_temp_files_and_writes_inside_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("a/b", b"1")
    store.create_if_absent("a/b", b"2")
    store.create_if_absent("a/c", b"3")
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b", "c"]
    assert store.local_path("a/b") == tmp_path / "root" / "a" / "b"


def test_open_store_picks_backend_from_uri(tmp_path, seaweed_s3):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(tmp_path.as_uri()).uri == tmp_path.as_uri()
    s3 = open_store(f"s3://{seaweed_s3.bucket}/some/prefix/")
    assert isinstance(s3, S3Store) and s3.uri == f"s3://{seaweed_s3.bucket}/some/prefix"


@pytest.mark.slow
def test_listing_paginates_past_1000_keys(store):
    keys = [f"many/{i:05d}.txt" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"x"), keys))
    assert list(store.list("many/")) == keys


def test_s3_multipart_upload_for_large_objects(s3_uri):
    store = S3Store(s3_uri, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    data = os.urandom(11 * MIB + 123)
    store.put_bytes("big/blob.bin", data)
    assert store.get_bytes("big/blob.bin") == data
    (info,) = store.list_objects("big/")
    assert info.size == len(data)
    assert info.etag.endswith("-3"), "3 parts: 5 MiB + 5 MiB + the rest"


def test_s3_wrong_credentials_are_rejected_clearly(seaweed_s3, s3_uri):
    session = boto3.Session(aws_access_key_id=seaweed_s3.access_key, aws_secret_access_key="wrong-secret")
    store = S3Store(s3_uri, session=session)
    with pytest.raises(AccessDeniedError, match="refused the credentials"):
        store.put_bytes("x", b"1")
    with pytest.raises(AccessDeniedError):
        store.exists("x")


def test_s3_stores_share_one_client_until_the_aws_environment_changes(seaweed_s3, s3_uri, monkeypatch):
    # A client costs ~0.3 s of CPU to build; a partition opens a dozen stores.
    first, second = open_store(s3_uri), open_store(f"{s3_uri}/other")
    assert first._client is second._client
    first.put_bytes("shared/x", b"1")
    assert open_store(s3_uri).get_bytes("shared/x") == b"1"
    # Other credentials in the environment are a new client that uses them, not the cached one.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-and-wrong")
    rotated = open_store(s3_uri)
    assert rotated._client is not first._client
    with pytest.raises(AccessDeniedError):
        rotated.get_bytes("shared/x")
    assert first.get_bytes("shared/x") == b"1"


def test_s3_missing_bucket_is_a_clear_error(seaweed_s3):
    store = open_store("s3://no-such-bucket-retouch/x")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-retouch' does not exist"):
        list(store.list())


def test_s3_throttling_is_retried_until_success(fault_proxy, seaweed_s3, s3_uri):
    proxy = fault_proxy(first_n=2, status=503, code="SlowDown")
    store = S3Store(s3_uri, endpoint_url=proxy.endpoint_url, max_attempts=5)
    store.put_bytes("r/obj", b"survived")
    assert proxy.plan.faults == 2 and proxy.plan.requests == 3
    assert store.get_bytes("r/obj") == b"survived"


def test_s3_random_5xx_faults_are_absorbed(fault_proxy, seaweed_s3, s3_uri):
    proxy = fault_proxy(fraction=0.3, max_faults=12, status=500, code="InternalError", seed=7)
    store = S3Store(s3_uri, endpoint_url=proxy.endpoint_url, max_attempts=6)
    for i in range(15):
        store.put_bytes(f"f/{i:02d}", str(i).encode())
    assert [store.get_bytes(f"f/{i:02d}") for i in range(15)] == [str(i).encode() for i in range(15)]
    assert list(store.list("f/")) == [f"f/{i:02d}" for i in range(15)]
    # An injected fault answers instead of the server, so no write is lost behind a retry: the first
    # create of a fresh key wins, the second finds it, and the bytes are the first writer's.
    assert store.create_if_absent("f/lock", b"1") is True
    assert store.create_if_absent("f/lock", b"2") is False
    assert store.get_bytes("f/lock") == b"1"
    assert proxy.plan.faults > 3, "the plan must actually have injected faults"


def test_s3_gives_up_after_max_attempts_with_clear_error(fault_proxy, seaweed_s3, s3_uri):
    proxy = fault_proxy(first_n=100, status=503, code="SlowDown")
    store = S3Store(s3_uri, endpoint_url=proxy.endpoint_url, max_attempts=3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"503 SlowDown.*after 3 attempts"):
        store.get_bytes("r/anything")
    assert proxy.plan.requests == 3
    assert time.monotonic() - started < 20  # bounded backoff, generous for a loaded machine


def test_s3_body_cut_mid_download_is_retried(fault_proxy, s3_uri):
    data = os.urandom(256 * 1024)
    S3Store(s3_uri).put_bytes("cut/obj", data)
    proxy = fault_proxy(truncate_first_n_gets=2)
    store = S3Store(s3_uri, endpoint_url=proxy.endpoint_url, max_attempts=4, backoff_base_s=0.01)
    assert store.get_bytes("cut/obj") == data
    assert proxy.plan.truncated == 2
    # botocore alone does not retry a broken body: with one attempt the cut surfaces as our error.
    once = S3Store(s3_uri, endpoint_url=fault_proxy(truncate_first_n_gets=1).endpoint_url, max_attempts=1)
    with pytest.raises(StoreUnavailableError, match="gave up after 1 attempts"):
        once.get_bytes("cut/obj")


def test_s3_unreachable_endpoint_is_a_clear_error(s3_uri):
    store = S3Store(s3_uri, endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(StoreUnavailableError, match="cannot reach"):
        store.get_bytes("x")


def test_local_download_file_copies(tmp_path: Path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("m/w.bin", b"weights")
    store.download_file("m/w.bin", tmp_path / "out" / "w.bin")
    assert (tmp_path / "out" / "w.bin").read_bytes() == b"weights"
    with pytest.raises(NotFoundError):
        store.download_file("m/none", tmp_path / "out" / "none")


def test_byte_limit_refuses_a_larger_object_from_its_size_and_head_reads_only_the_start(store):
    store.put_bytes("big/obj", bytes(range(256)) * 40)  # 10240 bytes
    with pytest.raises(ObjectTooLargeError, match="10240 bytes exceeds the limit of 1000") as info:
        store.get_bytes("big/obj", max_bytes=1000)
    assert (info.value.size, info.value.limit) == (10240, 1000)
    assert store.get_bytes("big/obj", max_bytes=10240) == bytes(range(256)) * 40
    assert store.read_head("big/obj", 300) == ((bytes(range(256)) * 2)[:300], 10240)
    store.put_bytes("big/empty", b"")
    assert store.read_head("big/empty", 300) == (b"", 0)
    with pytest.raises(NotFoundError):
        store.read_head("big/none", 10)


@pytest.fixture
def escape(tmp_path: Path) -> tuple[LocalStore, Path]:
    """A local store and, next to it, a folder outside its root holding a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    return LocalStore(tmp_path / "root"), outside


def test_local_store_refuses_links_that_lead_out_of_its_root(escape):
    store, outside = escape
    (store.root / "catalogue").mkdir(parents=True)
    (store.root / "catalogue" / "link.png").symlink_to(outside / "secret.png")
    (store.root / "published").symlink_to(outside, target_is_directory=True)
    (store.root / "zero").symlink_to("/dev/zero")
    with pytest.raises(UnsafePathError, match="outside the store root"):
        store.get_bytes("catalogue/link.png")
    with pytest.raises(UnsafePathError, match="outside the store root"):
        store.put_bytes("published/secret.png", b"overwritten")
    with pytest.raises(UnsafePathError):
        store.create_if_absent("published/new.png", b"new")
    with pytest.raises(UnsafePathError):
        store.delete("published/secret.png")
    with pytest.raises(UnsafePathError):  # a device: refused before a single byte is read
        store.get_bytes("zero", max_bytes=10)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]
    assert (outside / "secret.png").read_bytes() == b"secret"
    # A link that stays inside the root is an ordinary object.
    store.put_bytes("real/a.png", b"inside")
    (store.root / "alias.png").symlink_to(store.root / "real" / "a.png")
    assert store.get_bytes("alias.png") == b"inside"


def test_local_listing_skips_and_reports_dangling_links_fifos_and_links_out(escape, caplog):
    store, outside = escape
    store.put_bytes("catalogue/ok.png", b"ok")
    (store.root / "catalogue" / "dangling.png").symlink_to(store.root / "catalogue" / "gone.png")
    (store.root / "catalogue" / "out.png").symlink_to(outside / "secret.png")
    os.mkfifo(store.root / "catalogue" / "fifo.png")
    assert list(store.list("catalogue/")) == ["catalogue/ok.png"]
    assert set(store.skipped) == {"catalogue/dangling.png", "catalogue/out.png", "catalogue/fifo.png"}
    assert "outside the store root" in store.skipped["catalogue/out.png"]
    assert "not a regular file" in store.skipped["catalogue/fifo.png"]
    assert "skipped catalogue/fifo.png" in caplog.text


def test_local_read_of_a_fifo_is_refused_instead_of_hanging(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("catalogue/x", b"")
    os.mkfifo(store.root / "catalogue" / "pipe.png")
    outcome: list[BaseException | bytes] = []
    reader = threading.Thread(target=lambda: outcome.append(_try(store.get_bytes, "catalogue/pipe.png")), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], UnsafePathError) and "not a regular file" in str(outcome[0])


def _try(fn, *args):
    try:
        return fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc
