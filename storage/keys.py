"""Object keys: the one place that decides what a key may look like.

Keys travel from index files, manifests and user input into both S3 and the local filesystem. The
same string must mean the same object in both, and must never escape the store root, so every
store operation validates its key here before touching anything.
"""

from __future__ import annotations

MAX_KEY_BYTES = 1024
# Local filesystems refuse longer file or folder names (NAME_MAX); S3 has no such limit, so a key
# that only S3 could hold would fail later, at the write, on a laptop store.
MAX_SEGMENT_BYTES = 255


class StoreError(Exception):
    """Base class for every storage failure, so callers can record one type and go on."""


class InvalidKeyError(StoreError, ValueError):
    """A key that would be ambiguous, unsafe or unrepresentable in one of the stores."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid key {key!r}: {reason}")


def validate_key(key: str) -> str:
    """Return `key` unchanged if both stores can hold it safely; raise `InvalidKeyError` otherwise.

    Rules, and why: no `..` segment and no leading `/` (a local store would write outside its root);
    no backslash (Windows-style separators mean different things on S3 and on disk); no control
    characters (they break logs, terminals and CSV indexes); no empty or `.` segments and no
    trailing `/` (S3 would keep `a//b` and `a/./b` distinct while a filesystem folds them into one
    file); at most 1024 UTF-8 bytes (the S3 limit) and at most 255 bytes per segment (the limit of a
    file name on local filesystems).
    """
    if not isinstance(key, str):
        raise InvalidKeyError(repr(key), f"must be a str, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, "empty key")
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKeyError(key, f"longer than {MAX_KEY_BYTES} bytes in UTF-8")
    bad = next((c for c in key if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise InvalidKeyError(key, f"contains control character {bad!r}")
    if "\\" in key:
        raise InvalidKeyError(key, "contains a backslash; use '/' as the separator")
    if key.startswith("/"):
        raise InvalidKeyError(key, "absolute path; keys are relative to the store root")
    if key.endswith("/"):
        raise InvalidKeyError(key, "ends with '/'; a key names an object, not a folder")
    for segment in key.split("/"):
        if segment == "..":
            raise InvalidKeyError(key, "contains a '..' segment")
        if segment in ("", "."):
            raise InvalidKeyError(key, "contains an empty or '.' segment")
        if len(segment.encode("utf-8", errors="surrogatepass")) > MAX_SEGMENT_BYTES:
            raise InvalidKeyError(key, f"a segment is longer than {MAX_SEGMENT_BYTES} bytes in UTF-8")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: like a key, but empty and a trailing `/` are allowed."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


def join_key(*segments: str) -> str:
    """Join key segments with `/` and validate the result, so layouts never build a bad key."""
    return validate_key("/".join(segments))
