"""The light field under the LUT: fitting, applying at any resolution, choosing it on held-out pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from editing.light_field import (
    INVISIBLE_DB,
    LightField,
    apply_light_field,
    choose_light_field,
    field_from_tensors,
    field_tensors,
    fit_light_field,
    remove_light_field,
)
from editing.metrics import psnr
from editing.photometric import apply_lut, fit_lut


def _photo(seed: int, size=(80, 60)) -> Tensor:
    """Smooth colour fields plus texture, (3, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[0:height, 0:width] / max(size)
    base = np.stack([xx, yy, 1 - xx * yy]) * rng.uniform(0.4, 0.9, (3, 1, 1)) + rng.normal(0, 0.06, (3, height, width))
    return torch.from_numpy(base.clip(0, 1)).float()


def _coords(x: Tensor) -> tuple[Tensor, Tensor]:
    height, width = x.shape[-2:]
    return (torch.linspace(-1, 1, height).view(-1, 1), torch.linspace(-1, 1, width).view(1, -1))


def _vignette(x: Tensor) -> Tensor:
    ys, xs = _coords(x)
    return x * (1 - 0.6 * (xs**2 + ys**2) / 2)


def _dodge(x: Tensor) -> Tensor:
    ys, xs = _coords(x)
    weight = 0.3 * torch.exp(-((xs - 0.3) ** 2 + ys**2) / 0.3)
    return (x + weight * (1 - x)).clamp(0, 1)


def _warm(x: Tensor) -> Tensor:
    return torch.stack([x[0] ** 0.8, x[1], x[2] * 0.8 + 0.05]).clamp(0, 1)



@pytest.mark.parametrize("edit", [_vignette, _dodge], ids=["vignette", "dodge"])
def test_a_fitted_field_reproduces_a_spatial_light_edit_at_another_resolution(edit):
    pairs = [(x, edit(x)) for x in (_photo(i, size=(64 + 8 * i, 48 + 4 * i)) for i in range(6))]
    field = fit_light_field(pairs)
    test = _photo(99, size=(211, 137))  # another size and aspect ratio than every pair
    truth = edit(test)
    assert psnr(test, truth) < 25  # the edit is visible
    assert psnr(apply_light_field(field, test), truth) > 40
    assert psnr(remove_light_field(field, truth), test) > 35


def test_a_global_grade_gets_no_field_and_a_spatial_one_does():
    """As the route uses it: on what a LUT fitted to the pairs leaves (nothing spatial for a grade)."""
    photos = [_photo(i) for i in range(6)]
    lut = fit_lut([(_pil(x), _pil(_warm(x))) for x in photos], size=9)
    none, report = choose_light_field([(apply_lut(lut, _pil(x)), _pil(_warm(x))) for x in photos])
    assert none is None and report["used"] is False and report["gain_db"] < 0.5
    field, report = choose_light_field([(x, _vignette(x)) for x in photos])
    assert field is not None and report["used"] is True and report["gain_db"] > 5
    assert report["held_out_psnr_with"] > report["held_out_psnr_without"] + 5


def _pil(x: Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_too_few_pairs_for_a_held_out_check_give_no_field():
    field, report = choose_light_field([(x, _vignette(x)) for x in (_photo(0), _photo(1))])
    assert field is None and "too few" in report["reason"]


def test_pil_in_pil_out_and_the_identity_field_changes_nothing():
    image = _pil(_photo(3))
    identity = LightField(torch.ones(5, 5), torch.zeros(5, 5))
    out = apply_light_field(identity, image)
    assert isinstance(out, Image.Image) and out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_tensors_round_trip_and_bad_fields_are_refused():
    field = fit_light_field([(x, _vignette(x)) for x in (_photo(0), _photo(1), _photo(2))], grid=5)
    back = field_from_tensors(field_tensors(field))
    assert np.array_equal(back.gain, field.gain) and np.array_equal(back.offset, field.offset) and back.grid == 5
    with pytest.raises(ValueError, match="two \\(grid, grid\\) maps"):
        LightField(torch.ones(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        LightField(torch.full((3, 3), float("nan")), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no light field"):
        field_from_tensors({})
    with pytest.raises(ValueError, match="differ in size"):
        fit_light_field([(_photo(0), _photo(1, size=(30, 30)))])


def test_a_field_that_would_only_chase_invisible_error_is_not_kept():
    """Pairs the input already reproduces at over INVISIBLE_DB get no field, however large its relative gain."""
    photos = [_photo(i) for i in range(5)]
    faint = [(x, (x * (1 - 0.004 * _coords(x)[1].abs())).clamp(0, 1)) for x in photos]  # a 0.4 % side falloff
    field, report = choose_light_field(faint)
    assert report["held_out_psnr_without"] >= INVISIBLE_DB and report["gain_db"] >= 0.5
    assert field is None and report["used"] is False and "already reproduced" in report["reason"]
