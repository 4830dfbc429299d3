"""One `Store` interface over a local folder and an S3 bucket prefix.

Everything above this module passes keys relative to a store root and never learns which backend it
talks to, so the same flow runs on a laptop folder in tests and on S3 in production. The two
implementations must agree on semantics (sorted listing, atomic writes, create-if-absent), which is
why one test suite runs against both.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import boto3
import botocore.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from storage.keys import MAX_KEY_BYTES, InvalidKeyError, StoreError, validate_key, validate_prefix

__all__ = [
    "AccessDeniedError",
    "InvalidKeyError",
    "LocalStore",
    "NotFoundError",
    "ObjectInfo",
    "ObjectTooLargeError",
    "S3Store",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "UnsafePathError",
    "open_store",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 5
MIB = 1024 * 1024
# S3 refuses multipart parts under 5 MiB (except the last), so neither knob may go below it.
MIN_PART_SIZE = 5 * MIB
DEFAULT_MULTIPART_THRESHOLD = 64 * MIB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MIB
# Local temp files carry this prefix so listings can skip writes that are still in flight.
_TMP_PREFIX = ".retouch-tmp-"
# A shared S3 client is rebuilt after this long, so credentials or config files rotated under a
# long-lived process are read again.
CLIENT_MAX_AGE_S = 900
# Connections a shared client keeps open: one per thread of a wide task runner, without botocore's
# "connection pool is full" churn. At 32, publishing a 50-partition night (one thread per partition)
# logged that warning dozens of times; connections are opened on demand, so a large cap costs nothing.
CLIENT_POOL_CONNECTIONS = 128


class NotFoundError(StoreError, KeyError):
    """The key does not exist in the store."""

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        super().__init__(f"not found: {key!r}" + (f" in {where}" if where else ""))

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class AccessDeniedError(StoreError):
    """The backend refused the credentials; retrying will not help, fixing the configuration will."""


class StoreUnavailableError(StoreError):
    """The backend kept failing (throttling, 5xx, connection errors) after every allowed attempt."""


class ObjectTooLargeError(StoreError):
    """The object is larger than the caller's byte limit; refused before its body is read."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key, self.size, self.limit = key, size, limit
        super().__init__(f"{key}: {size} bytes exceeds the limit of {limit} bytes")


class UnsafePathError(StoreError):
    """A local key that leads outside the store root (a symbolic link) or to no regular file."""

    def __init__(self, key: str, reason: str) -> None:
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. `etag` is a change token: S3's ETag, or mtime+size for local files."""

    key: str
    size: int
    etag: str


class Store(ABC):
    """A flat key space of byte objects under one root URI."""

    uri: str

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """Return the object's bytes; `NotFoundError` if it is absent.

        With `max_bytes`, a larger object raises `ObjectTooLargeError` from the size the backend
        reports, before its body is read (a 2 GB upload must not be pulled into memory to be refused).
        """

    @abstractmethod
    def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        """The object's first `length` bytes (fewer if it is shorter) and its total size in bytes."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write the object atomically: readers see the old bytes or the new, never a mix."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield objects whose key starts with `prefix`, sorted by key, paginated under the hood."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if the object exists."""

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if absent; True if this call created it. Concurrent callers: exactly one wins."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is fine, so deletes can be repeated after a crash."""

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL a browser can open without credentials (reviewers follow these from the UI)."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The full URI of `key`, as recorded in manifests; `open_store` accepts its parent."""

    @abstractmethod
    def download_file(self, key: str, dest: Path) -> None:
        """Copy the object to a local file without holding it in memory (model weights are GBs)."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield keys (relative to the store root) starting with `prefix`, sorted."""
        return (info.key for info in self.list_objects(prefix))

    def local_path(self, key: str) -> Path | None:
        """The file behind `key` if the store is a local folder, else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def open_store(uri: str) -> Store:
    """Choose the backend from the URI: `s3://bucket/prefix`, `file:///path`, or a plain path."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: file:// URIs must name a local path (file:///path)")
        return LocalStore(Path(unquote(parsed.path)))
    if "://" in uri:
        raise StoreError(f"{uri}: unsupported scheme; use s3://bucket/prefix, file:///path or a path")
    return LocalStore(Path(uri))


class LocalStore(Store):
    """A folder on disk; keys map to files below it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        self.skipped: dict[str, str] = {}

    def _path(self, key: str) -> Path:
        """The file behind `key`, refused if a symbolic link on the way leads outside the root.

        Keys are validated text, but the folder is not: a `catalogue/link -> /elsewhere` would read,
        and a `published -> /elsewhere` write and delete, outside the store. Checked once per call;
        a link swapped in between this check and the I/O (a race needing write access to the folder
        itself) is not covered.
        """
        path = self.root / validate_key(key)
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise UnsafePathError(key, f"resolves to {resolved}, outside the store root {self.root}")
        return path

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def uri_for(self, key: str) -> str:
        return (self.root / validate_key(key)).as_uri()

    def _open_regular(self, key: str) -> tuple[int, int]:
        """An open read descriptor of the regular file behind `key`, and its size.

        Non-blocking, so a FIFO is refused instead of hanging the reader; devices and sockets are
        refused too (a link to /dev/zero would read until memory runs out).
        """
        path = self._path(key).resolve()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(key, self.uri) from None
        except OSError as exc:
            raise UnsafePathError(key, f"cannot be opened as a regular file: {exc.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return fd, st.st_size
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise NotFoundError(key, self.uri)
        raise UnsafePathError(key, "not a regular file (a FIFO, device or socket)")

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        fd, size = self._open_regular(key)
        with os.fdopen(fd, "rb") as f:
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLargeError(key, size, max_bytes)
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # grew since fstat
            raise ObjectTooLargeError(key, len(data), max_bytes)
        return data

    def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        fd, size = self._open_regular(key)
        with os.fdopen(fd, "rb") as f:
            return f.read(length), size

    def _write_temp(self, path: Path, data: bytes) -> Path:
        """Write `data` next to `path` (same filesystem, so link/rename are atomic), fsync'd."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, bytes(data))
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, bytes(data))
        try:
            # link() fails if the target exists, unlike rename(); the file appears complete or not at all.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        # S3 has no folders; prune the ones we emptied so both stores list the same.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Regular files only: dangling links, links out of the root, FIFOs, devices and sockets are
        skipped, logged and kept in `skipped` (key -> reason), so one odd file never breaks a listing."""
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix pins down; the rest of the prefix filters names.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return iter(())
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(_TMP_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    st = self._listed_file(key, os.path.join(dirpath, name))
                    if st is not None:
                        found.append(ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}"))
        # Python orders str by code point, which is UTF-8 byte order: the same order S3 lists in.
        found.sort(key=lambda info: info.key)
        return iter(found)

    def _listed_file(self, key: str, path: str) -> os.stat_result | None:
        """The stat of a listed regular file inside the root, or None (skipped and reported)."""
        reason = None
        try:
            st = os.stat(path)
            resolved = Path(path).resolve()
            if self.root not in resolved.parents:
                reason = f"a link to {resolved}, outside the store root"
            elif not stat.S_ISREG(st.st_mode):
                reason = "not a regular file (a FIFO, device or socket)"
        except OSError as exc:
            reason = f"unreadable ({exc.strerror}; a dangling link?)"
        if reason is None:
            return st
        if self.skipped.get(key) != reason:
            log.warning("%s: skipped %s in listing: %s", self.uri, key, reason)
        self.skipped[key] = reason
        return None

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self.uri_for(key)

    def download_file(self, key: str, dest: Path) -> None:
        fd, _ = self._open_regular(key)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


# Error codes that mean "try again later" rather than "your request is wrong".
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "ConditionalRequestConflict",
    }
)
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
# Failures while streaming a response body: botocore's retry handler has already returned by then.
_STREAM_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


def _client_config(mode: str, max_attempts: int) -> Config:
    return Config(
        retries={"mode": mode, "total_max_attempts": max_attempts},
        signature_version="s3v4",
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=CLIENT_POOL_CONNECTIONS,
    )


_CLIENTS: dict[tuple, tuple[float, Any]] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(endpoint_url: str | None, mode: str, max_attempts: int) -> Any:
    """One boto3 S3 client per process and configuration, shared by every `S3Store` built without a
    session.

    Building a client costs about 0.3 s of CPU (a new boto3 session parses the S3 service model
    again), and every `open_store` used to pay it: about a dozen times per catalogue partition, more
    than editing 100 small images costs. botocore clients are thread-safe. The key holds every
    `AWS_*` variable (endpoint, credentials, profile, config files) and the process id, so a changed
    environment or a forked child gets its own client; `CLIENT_MAX_AGE_S` bounds how long a rotated
    credentials file goes unread.
    """
    env = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_")))
    key = (os.getpid(), endpoint_url, mode, max_attempts, env)
    now = time.monotonic()
    with _CLIENTS_LOCK:
        built, client = _CLIENTS.get(key, (None, None))
        if built is None or now - built > CLIENT_MAX_AGE_S:
            for old in [k for k, (t, _) in _CLIENTS.items() if now - t > CLIENT_MAX_AGE_S or k[0] != key[0]]:
                del _CLIENTS[old]
            config = _client_config(mode, max_attempts)
            client = boto3.Session().client("s3", endpoint_url=endpoint_url, config=config)
            _CLIENTS[key] = (now, client)
        return client


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", "")), int(status or 0)


class S3Store(Store):
    """A bucket prefix on S3 or any S3-compatible server, configured the standard AWS way.

    Credentials, region, profile and endpoint come from boto3's default chain (`AWS_*` env vars,
    `AWS_PROFILE`, `~/.aws/config`, `AWS_ENDPOINT_URL`), so deployment changes need no code.
    Retries: botocore's `standard` mode (or `adaptive` if `AWS_RETRY_MODE=adaptive`) retries
    throttling, 5xx and connection errors per request with jittered exponential backoff; this class
    adds the same policy around what botocore cannot see, such as a body that breaks mid-download or a
    409 from concurrent conditional writes. `max_attempts` (default `AWS_MAX_ATTEMPTS` or 5) bounds
    both.
    """

    def __init__(
        self,
        uri: str,
        *,
        session: boto3.Session | None = None,
        endpoint_url: str | None = None,
        max_attempts: int | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        backoff_base_s: float = 0.1,
    ) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"{uri}: expected s3://bucket[/prefix]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if max_attempts is None:
            max_attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if multipart_threshold < MIN_PART_SIZE or multipart_chunksize < MIN_PART_SIZE:
            raise ValueError("multipart_threshold and multipart_chunksize must be at least 5 MiB")
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        mode = "adaptive" if os.environ.get("AWS_RETRY_MODE") == "adaptive" else "standard"
        if session is None:
            self._client = _shared_client(endpoint_url, mode, max_attempts)
        else:
            config = _client_config(mode, max_attempts)
            self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=4,
        )
        self.multipart_threshold = multipart_threshold

    def _full(self, key: str) -> str:
        validate_key(key)
        full = f"{self.prefix}/{key}" if self.prefix else key
        if len(full.encode()) > MAX_KEY_BYTES:  # S3's limit counts the bucket prefix too
            raise InvalidKeyError(key, f"with the store prefix {self.prefix!r} longer than {MAX_KEY_BYTES} bytes")
        return full

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _where(self, key: str) -> str:
        """Like `uri_for` but unvalidated: error messages also name listing prefixes."""
        return f"{self.uri}/{key}" if key else self.uri

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying what botocore does not, and turn failures into `StoreError`s.

        botocore has already spent its attempts on a retryable ClientError that reaches us, so those
        are reported, not retried again (that would square the attempt count). Streaming errors and
        409 conditional-write conflicts are retried here with jittered exponential backoff.
        """
        attempt = 1
        while True:
            try:
                return fn()
            except botocore.exceptions.ClientError as exc:
                code, status = _error_code(exc)
                if code == "ConditionalRequestConflict" and attempt < self.max_attempts:
                    attempt = self._sleep(what, key, attempt, exc)
                    continue
                raise self._translate(what, key, exc, code, status) from exc
            except S3UploadFailedError as exc:
                raise StoreUnavailableError(f"{what} {self._where(key)} failed: {exc}") from exc
            except _STREAM_ERRORS as exc:
                if attempt < self.max_attempts:
                    attempt = self._sleep(what, key, attempt, exc)
                    continue
                raise StoreUnavailableError(
                    f"{what} {self._where(key)}: gave up after {attempt} attempts: {exc}"
                ) from exc
            except botocore.exceptions.EndpointConnectionError as exc:
                raise StoreUnavailableError(
                    f"{what} {self._where(key)}: cannot reach the S3 endpoint after "
                    f"{self.max_attempts} attempts: {exc}"
                ) from exc
            except botocore.exceptions.NoCredentialsError as exc:
                raise AccessDeniedError(
                    f"{what} {self._where(key)}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                ) from exc

    def _sleep(self, what: str, key: str, attempt: int, exc: Exception) -> int:
        delay = random.uniform(0, self.backoff_base_s * 2 ** (attempt - 1))
        log.warning("%s %s: attempt %d failed (%s); retrying in %.2fs", what, key, attempt, exc, delay)
        time.sleep(delay)
        return attempt + 1

    def _translate(
        self, what: str, key: str, exc: botocore.exceptions.ClientError, code: str, status: int
    ) -> StoreError:
        where = self._where(key)
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code != "NoSuchBucket"):
            return NotFoundError(key, self.uri)
        if code == "NoSuchBucket":
            return StoreError(f"{what} {where}: bucket {self.bucket!r} does not exist")
        if code in _ACCESS_CODES or status == 403:
            return AccessDeniedError(
                f"{what} {where}: S3 refused the credentials ({code or status}); check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket policy"
            )
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        if code in _RETRYABLE_CODES or status >= 500:
            return StoreUnavailableError(
                f"{what} {where}: S3 kept answering {status} {code} and we gave up after {attempts} "
                f"attempts (max_attempts={self.max_attempts})"
            )
        return StoreError(f"{what} {where}: S3 error {status} {code}: {exc}")

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        full = self._full(key)

        def get() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise ObjectTooLargeError(key, response["ContentLength"], max_bytes)
            return response["Body"].read()

        return self._call("get", key, get)

    def read_head(self, key: str, length: int) -> tuple[bytes, int]:
        full = self._full(key)

        def get() -> tuple[bytes, int]:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes=0-{length - 1}")
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc)[0] == "InvalidRange":  # S3's answer for any range of an empty object
                    return b"", 0
                raise
            total = response.get("ContentRange", "").rpartition("/")[2]
            head = response["Body"].read()
            return head, int(total) if total.isdigit() else response["ContentLength"]

        return self._call("get", key, get)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        full = self._full(key)
        extra = {"ContentType": content_type} if content_type else {}
        if len(data) < self.multipart_threshold:
            self._call(
                "put", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)
            )
            return
        # Large objects go up in parts: a failed part is retried alone instead of the whole object,
        # and S3 only shows the object once CompleteMultipartUpload succeeds (still atomic).
        self._call(
            "put",
            key,
            lambda: self._client.upload_fileobj(
                io.BytesIO(data), self.bucket, full, ExtraArgs=extra or None, Config=self._transfer
            ),
        )

    def create_if_absent(self, key: str, data: bytes) -> bool:
        """`If-None-Match: *` makes S3 itself arbitrate: 412 means someone else created it first.

        Caveat shared by every S3 client: if our PUT succeeded but its response was lost and botocore
        retried, the retry sees our own object and this returns False.
        """
        full = self._full(key)
        try:
            self._call(
                "create",
                key,
                lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*"),
            )
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and _error_code(cause)[1] == 412:
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            self._call("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        except NotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=root + prefix))
        found: list[ObjectInfo] = []
        while (page := self._call("list", prefix, lambda: next(pages, None))) is not None:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(root) :]
                if key and not key.endswith("/"):  # skip "folder" marker objects made by consoles
                    found.append(ObjectInfo(key, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
        # AWS general-purpose buckets list in byte order, but directory buckets and some S3-compatible
        # servers (SeaweedFS among them) do not; sorting here keeps the contract on every backend.
        found.sort(key=lambda info: info.key)
        return iter(found)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires_s
        )

    def download_file(self, key: str, dest: Path) -> None:
        full = self._full(key)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "download",
            key,
            lambda: self._client.download_file(self.bucket, full, str(dest), Config=self._transfer),
        )
