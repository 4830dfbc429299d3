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


# The expected-colour check: CIEDE2000 between the output and the category's LUT applied to the source.


def _hue_rotated(image: Image.Image, degrees: float) -> Image.Image:
    """Rotate every colour about the grey axis (a hue shift that keeps luminance roughly)."""
    axis = np.ones(3) / np.sqrt(3)
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(axis, axis)
    rgb = np.asarray(image, dtype=np.float64) / 255 @ rotation.T
    return Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))


def _gains(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    rgb = np.asarray(image, dtype=np.float64) * np.array(gains)
    return Image.fromarray(rgb.clip(0, 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def warm_expected(coffee) -> Image.Image:
    """What the warm category's LUT, fitted on two training photos, makes of the coffee photo."""
    from editing.photometric import apply_lut, fit_lut

    pairs = [(Image.fromarray(load_photo(n)), _edit(load_photo(n), "warm")) for n in ("astronaut", "rocket")]
    return apply_lut(fit_lut(pairs, size=17), Image.fromarray(coffee))


def test_true_edit_passes_the_colour_check(warm_reference, warm_expected, coffee):
    result = quality.assess(Image.fromarray(coffee), _edit(coffee, "warm"), warm_reference, expected=warm_expected)
    assert result.status == "pass", result.reasons
    assert result.deltae2000_mean < 0.5
    assert result.deltae2000_p95 < 1.5


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda image: _gains(image, (1.12, 0.96, 0.96)), id="red cast"),
        pytest.param(lambda image: _hue_rotated(image, 25), id="hue rotation"),
        pytest.param(lambda image: _gains(image, (0.75, 0.82, 1.4)), id="cool instead of warm"),
    ],
)
def test_wrong_colour_is_flagged_or_failed(bad, warm_reference, warm_expected, coffee):
    output = bad(_edit(coffee, "warm"))
    result = quality.assess(Image.fromarray(coffee), output, warm_reference, expected=warm_expected)
    assert result.status in ("flag", "fail")
    assert any("expected edit" in reason for reason in result.reasons), result.reasons
    assert result.deltae2000_mean > quality.QCThresholds().flag_deltae2000_mean


def test_red_cast_passes_every_check_but_colour(warm_reference, warm_expected, coffee):
    """Why the colour check exists: a cast on an intact photo keeps the structure and direction."""
    output = _gains(_edit(coffee, "warm"), (1.12, 0.96, 0.96))
    blind = quality.assess(Image.fromarray(coffee), output, warm_reference)
    assert blind.status == "pass"
    assert math.isnan(blind.deltae2000_mean)
    seeing = quality.assess(Image.fromarray(coffee), output, warm_reference, expected=warm_expected)
    assert seeing.status != "pass"


def test_other_category_grade_fails(warm_reference, warm_expected, coffee):
    result = quality.assess(Image.fromarray(coffee), _edit(coffee, "sepia"), warm_reference, expected=warm_expected)
    assert result.status == "fail"
    assert result.deltae2000_mean > quality.QCThresholds().fail_deltae2000_mean


def test_deltae2000_is_zero_for_the_same_image_and_grows_with_the_cast(coffee):
    rgb = coffee.astype(np.float64) / 255
    assert np.abs(quality.deltae2000(rgb, rgb)).max() == pytest.approx(0.0, abs=1e-9)
    mild = quality.deltae2000(rgb * [1.04, 1, 1], rgb).mean()
    strong = quality.deltae2000(rgb * [1.15, 1, 1], rgb).mean()
    assert 0.3 < mild < strong


def test_colour_figures_are_json_ready_and_expected_may_be_an_array(warm_reference, warm_expected, coffee):
    output = _edit(coffee, "warm")
    from_image = quality.assess(Image.fromarray(coffee), output, warm_reference, expected=warm_expected)
    from_array = quality.assess(Image.fromarray(coffee), output, warm_reference,
                                expected=np.asarray(warm_expected, dtype=np.float64) / 255).figures()
    assert from_array["status"] == "pass"
    assert isinstance(from_array["deltae2000_mean"], float) and isinstance(from_array["deltae2000_p95"], float)
    assert from_array["deltae2000_mean"] == pytest.approx(from_image.deltae2000_mean, abs=0.05)


@pytest.mark.parametrize(
    "low, high",
    [("flag_deltae2000_mean", "fail_deltae2000_mean"), ("flag_deltae2000_p95", "fail_deltae2000_p95"),
     ("flag_clipped_fraction", "fail_clipped_fraction"), ("fail_ssim_structure", "flag_ssim_structure")],
)
def test_thresholds_refuse_a_flag_beyond_its_fail(low, high):
    with pytest.raises(ValueError, match=low):
        quality.QCThresholds(**{low: 0.9, high: 0.5})


def test_clipping_the_expected_edit_does_itself_is_not_an_artefact():
    from editing.photometric import apply_lut, fit_lut

    pairs = [(Image.fromarray(load_photo(n)), _edit(load_photo(n), "increase_contrast")) for n in ("astronaut", "china")]
    reference = quality.reference_shift(pairs)
    rocket = load_photo("rocket")
    source, true = Image.fromarray(rocket), _edit(rocket, "increase_contrast")
    expected = apply_lut(fit_lut(pairs, size=17), source)
    blind = quality.assess(source, true, reference)
    assert blind.clipped_fraction > quality.QCThresholds().flag_clipped_fraction  # the grade clips a lot
    seeing = quality.assess(source, true, reference, expected=expected)
    assert seeing.status == "pass", seeing.reasons
    assert seeing.clipped_fraction < 0.1
    over = Image.fromarray((np.asarray(true, dtype=np.float64) * 1.8).clip(0, 255).astype(np.uint8))
    over_result = quality.assess(source, over, reference, expected=expected)
    assert over_result.status == "fail"
    assert "colour far from the expected edit" in over_result.reasons


def _crisp(photo: np.ndarray) -> Image.Image:
    """The demo's first crisp-product style: more contrast, then 2x saturation."""
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    y = EDITS["saturate"].function(EDITS["increase_contrast"].function(x))[0].permute(1, 2, 0).numpy()
    return Image.fromarray((y * 255).round().clip(0, 255).astype(np.uint8))


def test_a_red_face_is_not_a_pass_even_when_it_is_exactly_the_expected_edit():
    """The category's own LUT reproduces the style exactly, so the colour check against it sees
    nothing; the skin check does, and nothing excuses it."""
    portrait = load_photo("grace_hopper")
    source, red = Image.fromarray(portrait), _crisp(portrait)
    reference = quality.reference_shift([(source, red)])
    result = quality.assess(source, red, reference, expected=red)
    assert result.deltae2000_mean < 0.1  # exactly what the category asks for
    assert result.skin_outliers > quality.QCThresholds().flag_skin_outliers
    assert result.status != "pass" and "skin tones out of range" in result.reasons


@pytest.mark.parametrize("edit", ["warm", "desaturate", "grayscale", "brighten", "sepia"])
def test_grades_that_keep_skin_a_skin_tone_pass_the_skin_check(edit: str):
    portrait = load_photo("grace_hopper")
    source, graded = Image.fromarray(portrait), _edit(portrait, edit)
    result = quality.assess(source, graded, quality.reference_shift([(source, graded)]), expected=graded)
    assert result.skin_outliers < 0.1, result.skin_outliers
    assert result.status == "pass", result.reasons


def test_a_green_cast_on_a_face_is_flagged_and_skinless_photos_are_not_judged():
    portrait = load_photo("astronaut")
    x = torch.from_numpy(portrait).permute(2, 0, 1)[None].float() / 255
    green = (x * torch.tensor([0.8, 1.15, 0.8]).view(1, 3, 1, 1)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    source = quality._as_float(Image.fromarray(portrait))
    cast = quality._as_float(Image.fromarray((green * 255).round().astype(np.uint8)))
    assert quality.skin_outliers(source, cast) > quality.QCThresholds().flag_skin_outliers
    blue = np.zeros((64, 64, 3))
    blue[..., 2] = np.linspace(0.3, 1.0, 64)
    assert math.isnan(quality.skin_outliers(blue, blue[..., ::-1]))
