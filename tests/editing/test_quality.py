"""QC decisions on real photos with known ground-truth edits: what passes, what is flagged, what fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from editing import quality
from editing.photos import load_photo
from editing.transforms import EDITS


def _edit(photo: np.ndarray, name: str) -> Image.Image:
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    y = EDITS[name].function(x)[0].permute(1, 2, 0).numpy()
    return Image.fromarray((y * 255).round().clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def warm_reference() -> list[float]:
    pairs = [(Image.fromarray(load_photo(n)), _edit(load_photo(n), "warm")) for n in ("astronaut", "rocket")]
    return quality.reference_shift(pairs)


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return load_photo("coffee")


def test_same_edit_as_exemplars_passes(warm_reference, coffee):
    result = quality.assess(Image.fromarray(coffee), _edit(coffee, "warm"), warm_reference)
    assert result.status == "pass", result.reasons
    assert result.ssim_structure > 0.99
    assert result.direction_agreement > 0.8
    assert 0.5 < result.edit_strength < 2.0


def test_opposite_edit_is_flagged_for_direction(warm_reference, coffee):
    result = quality.assess(Image.fromarray(coffee), _edit(coffee, "cool"), warm_reference)
    assert result.status == "flag"
    assert result.direction_agreement < 0
    assert "direction differs from exemplars" in result.reasons


def test_unedited_output_is_flagged_as_too_weak(warm_reference, coffee):
    result = quality.assess(Image.fromarray(coffee), Image.fromarray(coffee), warm_reference)
    assert result.status == "flag"
    assert result.edit_strength == pytest.approx(0.0, abs=1e-9)


def test_noise_loses_structure_and_fails(warm_reference, coffee):
    noise = np.random.default_rng(0).integers(0, 256, coffee.shape, dtype=np.uint8)
    result = quality.assess(Image.fromarray(coffee), Image.fromarray(noise), warm_reference)
    assert result.status == "fail"
    assert result.ssim_structure < 0.35


def test_flat_output_fails(warm_reference, coffee):
    result = quality.assess(Image.fromarray(coffee), Image.fromarray(np.full_like(coffee, 120)), warm_reference)
    assert result.status == "fail"
    assert "flat output" in result.reasons


def test_nan_output_fails_without_other_figures(warm_reference, coffee):
    output = coffee.astype(np.float64) / 255
    output[:10] = np.nan
    result = quality.assess(Image.fromarray(coffee), output, warm_reference)
    assert result.status == "fail"
    assert result.nonfinite_fraction > 0
    assert math.isnan(result.ssim_structure)


def test_output_at_other_size_is_compared_at_source_size(warm_reference, coffee):
    small = _edit(coffee, "warm").resize((100, 66))
    result = quality.assess(Image.fromarray(coffee), small, warm_reference)
    assert result.status == "pass", result.reasons


def test_figures_are_json_ready(warm_reference, coffee):
    figures = quality.assess(Image.fromarray(coffee), _edit(coffee, "warm"), warm_reference).figures()
    assert isinstance(figures["shift"], list) and len(figures["shift"]) == 6
    assert figures["status"] == "pass"
