"""The per-process model cache: one load per (location, device, dtype)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.models import cached_model
from tests.tiny_models import build_tiny_ip2p


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p")


def test_each_dtype_is_loaded_once_and_kept_apart(tiny_model: Path) -> None:
    full = cached_model(str(tiny_model), "cpu")
    half = cached_model(str(tiny_model), "cpu", "bfloat16")
    assert (full.dtype, half.dtype) == ("float32", "bfloat16")
    assert cached_model(str(tiny_model), "cpu", "float32") is full
    assert cached_model(str(tiny_model), "cpu", "bfloat16") is half
    assert full.sha256 == half.sha256  # same weights: instructions learned on one apply on the other
