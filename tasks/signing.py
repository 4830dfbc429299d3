"""Signed review records: only decisions that came through the gate may be replayed from the store.

The gate (a worker running `review_and_publish`) signs every decision it records with an HMAC key that
lives on the worker side, never in the store: whoever can write to `review/run=<id>/decisions/`
(an exemplar uploader with a broad bucket policy, say) can drop files there but cannot sign them, so
the gate refuses them and names them. Without a key the gate signs nothing and replays nothing: it
asks the reviewer again instead, which is safe and only costs a second answer after a crash.

The key is read in one place, `signing_key()`: the environment variable `RETOUCH_SIGNING_KEY`, else
the Prefect Secret block named by `RETOUCH_SIGNING_SECRET_BLOCK`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

SIGNING_KEY_ENV = "RETOUCH_SIGNING_KEY"
SIGNING_SECRET_BLOCK_ENV = "RETOUCH_SIGNING_SECRET_BLOCK"
MIN_KEY_CHARS = 32
ALGORITHM = "HMAC-SHA256"


class SigningKeyError(ValueError):
    """The configured signing key is unusable (too short to be a secret)."""


def signing_key() -> bytes | None:
    """The workers' HMAC key, or None when none is configured (then nothing is signed or replayed)."""
    value = os.environ.get(SIGNING_KEY_ENV, "")
    if not value and (block := os.environ.get(SIGNING_SECRET_BLOCK_ENV)):
        from prefect.blocks.system import Secret

        value = str(Secret.load(block).get())
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:
        raise SigningKeyError(
            f"the review signing key has {len(value)} characters, at least {MIN_KEY_CHARS} are needed "
            "(e.g. `openssl rand -hex 32`)"
        )
    return value.encode()


def key_id(key: bytes) -> str:
    """A short public name of the key, so a record signed with an old key says so."""
    return hashlib.sha256(b"retouch-key-id\x00" + key).hexdigest()[:12]


def _mac(record: dict, key: bytes) -> str:
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def sign(record: dict, key: bytes | None) -> dict:
    """`record` with its `signature` (None when no key is configured)."""
    signature = {"alg": ALGORITHM, "key_id": key_id(key), "mac": _mac(record, key)} if key else None
    return {**record, "signature": signature}


def signature_problem(record: dict, key: bytes | None) -> str | None:
    """None if `record` was signed with `key` and not changed since; else why it cannot be trusted."""
    if key is None:
        return f"no signing key is configured ({SIGNING_KEY_ENV} or {SIGNING_SECRET_BLOCK_ENV})"
    signature = record.get("signature")
    if not isinstance(signature, dict) or not signature.get("mac"):
        return "not signed"
    if signature.get("alg") != ALGORITHM:
        return f"signed with an unknown algorithm {signature.get('alg')!r}"
    if signature.get("key_id") != key_id(key):
        return f"signed with another key (key id {signature.get('key_id')!r}, ours is {key_id(key)!r})"
    if not hmac.compare_digest(str(signature["mac"]), _mac(record, key)):
        return "altered after it was signed (the signature does not match its content)"
    return None
