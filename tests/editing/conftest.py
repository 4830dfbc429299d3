"""Fixtures for editing tests: tiny random model folders in the real diffusers format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.tiny_models import build_tiny_ip2p, build_tiny_t2i


@pytest.fixture(scope="session")
def tiny_ip2p_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p")


@pytest.fixture(scope="session")
def tiny_t2i_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t2i(tmp_path_factory.mktemp("models") / "tiny-t2i")


@pytest.fixture(scope="module")
def pipe(tiny_t2i_dir: Path) -> StableDiffusionPipeline:
    """The tiny text-to-image pipeline, fresh per test module (tests may change its UNet)."""
    torch.set_num_threads(1)
    return StableDiffusionPipeline.from_pretrained(tiny_t2i_dir, safety_checker=None)
