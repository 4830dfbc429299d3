"""What the photometric stage (a LUT, a light field) shares: telling tensors from other images without
importing torch, and a long-lived thread pool for working on a photo in horizontal strips.

The photometric stage runs on numpy and Pillow, so a process that only applies LUTs starts without
torch; its functions still take tensors from callers that have torch loaded.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Several strips per thread, so a thread slowed by another process does not hold up the photo.
STRIPS_PER_THREAD = 4
_STRIP_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_STRIP_POOLS_LOCK = threading.Lock()


def is_tensor(value: object) -> bool:
    """Whether `value` is a torch tensor. If torch was never imported, nothing can be one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def float32_array(value: object) -> np.ndarray:
    """A float32 numpy array of an array, a nested list or a tensor on any device (no copy when it is one)."""
    if is_tensor(value):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def strip_pool(threads: int) -> ThreadPoolExecutor:
    """One long-lived pool per process and thread count: starting threads on every call cost ~11 s of
    thread time over a 5,000-image night (benchmarks/scale.py profile). Keyed by the process id too,
    because a forked child inherits the dict but not the threads."""
    key = (os.getpid(), threads)
    with _STRIP_POOLS_LOCK:
        if key not in _STRIP_POOLS:
            _STRIP_POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="photo-strips")
        return _STRIP_POOLS[key]


def row_strips(height: int, threads: int) -> list[tuple[int, int]]:
    """(top, bottom) row ranges cutting `height` rows into `STRIPS_PER_THREAD * threads` strips."""
    strips = max(1, min(STRIPS_PER_THREAD * threads, height))
    return [(i * height // strips, (i + 1) * height // strips) for i in range(strips)]
