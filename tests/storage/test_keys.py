"""Key validation: one rule set for both stores, and every refusal says which key and why."""

from __future__ import annotations

import pytest

from storage.keys import InvalidKeyError, join_key, validate_key, validate_prefix


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "exemplars/relight/p1/before.jpg",
        "run=2026-11-21/part-0.parquet",
        "ünïcödé/ファイル.png",
        "a..b/c..",
        "/".join(["x" * 255] * 3 + ["x" * 254, "x"]),  # 1024 bytes, no segment over 255
    ],
)
def test_valid_keys_pass_unchanged(key):
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty key"),
        ("../secret", "'..' segment"),
        ("a/../../b", "'..' segment"),
        ("a/..", "'..' segment"),
        ("/etc/passwd", "absolute path"),
        ("a\\b", "backslash"),
        ("a\x00b", "control character"),
        ("a\tb", "control character"),
        ("a\x85b", "control character"),
        ("a//b", "empty or '.' segment"),
        ("./a", "empty or '.' segment"),
        ("a/", "ends with '/'"),
        ("é" * 513, "longer than 1024 bytes"),
        # A file name on local filesystems: an id of 300 characters would fail the write, not here.
        ("edited/" + "x" * 252 + ".png", "segment is longer than 255 bytes"),
    ],
)
def test_bad_keys_name_the_key_and_reason(key, reason):
    with pytest.raises(InvalidKeyError) as info:
        validate_key(key)
    assert info.value.key == key and reason in info.value.reason
    assert repr(key) in str(info.value)


def test_non_string_key_is_refused():
    with pytest.raises(InvalidKeyError, match="must be a str"):
        validate_key(b"bytes")  # type: ignore[arg-type]


def test_prefixes_may_be_empty_or_end_with_slash():
    assert validate_prefix("") == ""
    assert validate_prefix("exemplars/") == "exemplars/"
    for bad in ("/", "../", "a//"):
        with pytest.raises(InvalidKeyError):
            validate_prefix(bad)


def test_join_key_validates_the_result():
    assert join_key("edited", "run=r1", "a.png") == "edited/run=r1/a.png"
    with pytest.raises(InvalidKeyError):
        join_key("edited", "..", "a.png")
