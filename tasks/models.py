"""The model, loaded once per worker process, and the guarded model step.

Partitions run as threads of one process (or as runs on a GPU worker); loading a diffusion model per
partition would cost more than editing it, so the loaded model is cached by (location, device, dtype):
learning always uses float32, application the configured dtype.
Diffusers schedulers keep per-call state, so one process runs one model batch at a time; the optional
Prefect global concurrency slot extends that limit across processes and machines.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect.concurrency.sync import concurrency

from editing.models import LoadedModel, load_model
from storage.model_cache import materialise_model

_MODELS: dict[tuple[str, str, str], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()
_STEP_LOCK = threading.Lock()


def cached_model(model_uri: str | None, device: str, dtype: str = "float32") -> LoadedModel:
    """The InstructPix2Pix-format model at `model_uri` (None: the shipped one) in `dtype`, loaded at
    most once per process."""
    key = (model_uri or "", device, dtype)
    with _LOAD_LOCK:
        if key not in _MODELS:
            path = materialise_model(model_uri) if model_uri else None
            _MODELS[key] = load_model(path, kind="ip2p", device=device, dtype=dtype)
        return _MODELS[key]


@contextmanager
def model_step(slot: str | None) -> Iterator[None]:
    """Hold the process's model lock and, if named, one slot of the Prefect global concurrency limit."""
    with _STEP_LOCK, (concurrency(slot, occupy=1) if slot else nullcontext()):
        yield
