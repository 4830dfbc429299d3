"""Deterministic per-item seeds.

A re-run after a crash must draw the same noise for the same item, in any process, so seeds come
from a cryptographic hash of (run, item, category) rather than Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib


def item_seed(run_id: str, image_id: str, category: str) -> int:
    """A 63-bit seed that depends only on (run_id, image_id, category)."""
    digest = hashlib.sha256(f"{run_id}\x1f{image_id}\x1f{category}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
