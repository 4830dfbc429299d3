"""carry_edit: a native-size edit reaches the full-size photo as colour (a LUT) or as a local lift;
resolve_carry: the caller, then the model's caption, then the model's default, then lift."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from editing.carry import carry_edit, resolve_carry
from editing.metrics import psnr
from editing.photos import load_photo
from editing.text_edit import model_text_edit_defaults
from editing.transforms import EDITS


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    full = torch.from_numpy(load_photo("coffee")).permute(2, 0, 1).float() / 255
    return F.interpolate(full[None], size=(192, 256), mode="area")[0]


def _small(photo: torch.Tensor) -> torch.Tensor:
    return F.interpolate(photo[None], size=(64, 64), mode="area")[0]


def _drift(small: torch.Tensor) -> torch.Tensor:
    """What a diffusion model adds to a global edit: local blotches of colour that mean nothing."""
    generator = torch.Generator().manual_seed(0)
    blotches = F.interpolate(torch.randn(1, 3, 8, 8, generator=generator), size=small.shape[-2:], mode="bicubic")
    return 0.06 * blotches[0]


def test_colour_carry_reproduces_a_global_grade_and_drops_the_models_drift(photo: torch.Tensor) -> None:
    small = _small(photo)
    transform = EDITS["sepia"].function
    truth = transform(photo[None])[0]
    exact = carry_edit(photo, small, transform(small[None])[0], "colour")
    assert exact.mode == "colour" and exact.image.shape == photo.shape
    assert exact.colour_explains > 0.99
    assert psnr(exact.image, truth) > 40.0

    drifted = (transform(small[None])[0] + _drift(small)).clamp(0, 1)
    colour = carry_edit(photo, small, drifted, "colour")
    lift = carry_edit(photo, small, drifted, "lift")
    assert lift.mode == "lift" and lift.colour_explains is None
    # the LUT explains the grade, not the blotches; the lift carries both to full size
    assert colour.colour_explains < exact.colour_explains - 0.03
    assert psnr(colour.image, truth) >= psnr(lift.image, truth) + 3.0


def test_lift_carries_a_vignette_that_colour_cannot(photo: torch.Tensor) -> None:
    small = _small(photo)
    transform = EDITS["vignette"].function
    truth = transform(photo[None])[0]
    lift = carry_edit(photo, small, transform(small[None])[0], "lift")
    colour = carry_edit(photo, small, transform(small[None])[0], "colour")
    assert psnr(lift.image, truth) >= psnr(colour.image, truth) + 10.0


def test_an_edit_that_changed_nothing_returns_the_photo(photo: torch.Tensor) -> None:
    small = _small(photo)
    for mode in ("lift", "colour"):
        carried = carry_edit(photo, small, small.clone(), mode)
        assert psnr(carried.image, photo) > 45.0
    assert carry_edit(photo, small, small.clone(), "colour").colour_explains == 1.0


def test_bad_modes_and_shapes_are_refused(photo: torch.Tensor) -> None:
    small = _small(photo)
    with pytest.raises(ValueError, match="carry mode must be one of"):
        carry_edit(photo, small, small, "auto")
    with pytest.raises(ValueError, match="carry_edit expects"):
        carry_edit(photo, small, small[:, :32], "colour")


SPEC = {
    "model": "m",
    "edits": [
        {"id": "warm", "caption": "a warm photo", "carry": "colour"},
        {"id": "vignette", "caption": "a photo with a vignette", "carry": "lift"},
        {"id": "blur", "caption": "a blurry photo"},
    ],
    "defaults": {"text_edit": {"carry": "colour"}},
}


@pytest.mark.parametrize(
    ("spec", "prompt", "requested", "expected"),
    [
        (SPEC, "a warm photo", "lift", ("lift", "caller")),
        (SPEC, "  A Warm   photo", None, ("colour", "model caption")),
        (SPEC, "a photo with a vignette", None, ("lift", "model caption")),
        (SPEC, "a blurry photo", None, ("colour", "model")),  # listed, but without a choice
        (SPEC, "a golden photo", None, ("colour", "model")),
        ({"edits": SPEC["edits"]}, "a golden photo", None, ("lift", "default")),
        (None, "a warm photo", None, ("lift", "default")),
    ],
)
def test_resolve_carry_order(spec, prompt: str, requested: str | None, expected: tuple[str, str]) -> None:
    assert resolve_carry(spec, prompt, requested) == expected


def test_bad_carry_values_are_refused_with_where_they_came_from() -> None:
    with pytest.raises(ValueError, match="carry must be one of"):
        resolve_carry(SPEC, "a warm photo", "both")
    broken = {"model": "m", "edits": [{"caption": "a warm photo", "carry": "lut"}]}
    with pytest.raises(ValueError, match=r"m: edits.json edits\[0\].carry"):
        resolve_carry(broken, "a warm photo")
    with pytest.raises(ValueError, match="defaults.text_edit.carry"):
        model_text_edit_defaults({"model": "m", "defaults": {"text_edit": {"carry": "affine"}}})
    assert model_text_edit_defaults(SPEC) == {"carry": "colour"}
