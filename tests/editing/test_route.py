"""Routes of a learned instruction (LUT, LUT + learned stage, learned stage) on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from editing.instruct import (
    ApplyConfig,
    InstructionIntegrityError,
    InstructionPair,
    LearnConfig,
    RouteConfig,
    apply_instruction,
    learn_routed,
    load_instruction,
    save_instruction,
)
from editing.instruct.apply import expected_output
from editing.instruct.artifact import _content_hash
from editing.models import load_model
from editing.photometric import apply_lut

FAST = {"steps": 2, "eval_every": 2, "batch_size": 2, "eval_timesteps": (500,), "progress": False,
        "guidance_candidates": (), "init_instruction": "make it warmer"}
APPLY = ApplyConfig(num_inference_steps=2)


def _grade(image: Image.Image) -> Image.Image:
    """A global warm grade: a function of colour alone, which a LUT reproduces."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    y = np.stack([x[..., 0] ** 0.8, x[..., 1], x[..., 2] * 0.8 + 0.05], axis=-1)
    return Image.fromarray((y.clip(0, 1) * 255).round().astype(np.uint8))


def _photo(seed: int, size=(48, 40)) -> Image.Image:
    """Smooth colour fields plus noise, so the pairs cover a spread of colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 0.08, (*size[::-1], 3))
    return Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def model(tiny_ip2p_dir):
    return load_model(tiny_ip2p_dir)


@pytest.fixture(scope="module")
def pairs() -> list[InstructionPair]:
    return [InstructionPair(f"p{i}", b, _grade(b), sha256=f"{i:064x}") for i, b in
            ((i, _photo(i)) for i in range(5))]


def test_auto_keeps_the_lut_for_a_global_grade_and_records_every_route(model, pairs):
    learned = learn_routed(model, pairs, LearnConfig(**FAST), RouteConfig(lut_size=9), category="warm")
    choice = learned.metadata["route_choice"]
    assert learned.route == "lut" and choice["route"] == "lut" and choice["requested"] == "auto"
    assert set(choice["scores"]) == {"identity", "lut", "lut+instructbrush", "instructbrush"}
    # The held-out pairs are graded exactly by the LUT; a random model cannot get near it.
    assert choice["scores"]["lut"]["psnr"] > choice["scores"]["identity"]["psnr"] + 10
    assert choice["scores"]["lut"]["psnr"] > choice["scores"]["instructbrush"]["psnr"] + 0.5
    assert len(choice["held_out"]) == 2 and learned.lut.size == 9


def test_a_lut_instruction_round_trips_without_the_model_and_applies_at_full_resolution(model, pairs):
    learned = learn_routed(model, pairs, LearnConfig(**FAST), RouteConfig(route="lut", lut_size=9), "warm")
    data, metadata = save_instruction(learned)
    assert metadata["route"] == "lut" and metadata["lut_size"] == 9
    loaded = load_instruction(data, metadata, None)
    photo = _photo(9, size=(97, 61))
    [out] = apply_instruction(None, loaded, [photo], APPLY)
    assert out.size == photo.size
    assert np.array_equal(np.asarray(out), np.asarray(apply_lut(learned.lut, photo)))
    assert np.abs(np.asarray(out, float) - np.asarray(_grade(photo), float)).mean() < 4


def test_lut_then_learned_stage_edits_the_lut_output(model, pairs):
    learned = learn_routed(model, pairs, LearnConfig(**FAST), RouteConfig(route="lut+instructbrush", lut_size=9),
                           "warm")
    data, metadata = save_instruction(learned)
    loaded = load_instruction(data, metadata, model)
    assert loaded.route == "lut+instructbrush" and loaded.learned_stage and loaded.photometric_stage
    photo = _photo(7)
    [both] = apply_instruction(model, loaded, [photo], APPLY, seeds=[3])
    loaded.route = "instructbrush"  # the learned stage alone, fed the LUT's output by hand
    [by_hand] = apply_instruction(model, loaded, [apply_lut(loaded.lut, photo)], APPLY, seeds=[3])
    assert np.array_equal(np.asarray(both), np.asarray(by_hand))
    with pytest.raises(ValueError, match="load it with the model"):
        load_instruction(data, metadata, None)


def test_a_lut_of_another_size_than_recorded_is_refused(model, pairs):
    learned = learn_routed(model, pairs, LearnConfig(**FAST), RouteConfig(route="lut", lut_size=9), "warm")
    data, metadata = save_instruction(learned)
    forged = {**metadata, "lut_size": 17}
    forged["content_sha256"] = _content_hash(data, forged)
    with pytest.raises(InstructionIntegrityError, match="lut_size=17"):
        load_instruction(data, forged, None)


def test_too_few_pairs_to_hold_any_back_choose_the_lut(model, pairs):
    learned = learn_routed(model, pairs[:3], LearnConfig(**FAST), RouteConfig(lut_size=9), "warm")
    assert learned.route == "lut" and "too few" in learned.metadata["route_choice"]["reason"]


def _vignette(image: Image.Image) -> Image.Image:
    """A global grade, then darker corners: colour alone cannot explain it."""
    x = np.asarray(_grade(image), dtype=np.float64) / 255.0
    ys, xs = np.mgrid[-1 : 1 : x.shape[0] * 1j, -1 : 1 : x.shape[1] * 1j]
    return Image.fromarray(((x * (1 - 0.6 * (xs**2 + ys**2) / 2)[..., None]).clip(0, 1) * 255).round().astype(np.uint8))


def test_a_vignette_gets_a_light_field_under_the_lut_that_round_trips(model):
    photos = [_photo(i, size=(48 + 4 * i, 40)) for i in range(6)]
    pairs = [InstructionPair(f"v{i}", b, _vignette(b), sha256=f"{i:064x}") for i, b in enumerate(photos)]
    learned = learn_routed(model, pairs, LearnConfig(**FAST), RouteConfig(route="lut", lut_size=9), "vignette")
    assert learned.light_field is not None and learned.metadata["light_field"]["used"] is True
    data, metadata = save_instruction(learned)
    assert metadata["light_field_grid"] == learned.light_field.grid
    loaded = load_instruction(data, metadata, None)
    photo = _photo(11, size=(123, 77))
    [out] = apply_instruction(None, loaded, [photo], APPLY)
    [colour_only] = apply_instruction(None, learn_routed(
        model, pairs, LearnConfig(**FAST), RouteConfig(route="lut", lut_size=9, light_field=False), "vignette"
    ), [photo], APPLY)
    truth = np.asarray(_vignette(photo), float)
    error = np.abs(np.asarray(out, float) - truth).mean()
    assert error < 3 and error < np.abs(np.asarray(colour_only, float) - truth).mean() / 3
    assert np.array_equal(np.asarray(out), np.asarray(expected_output(loaded, photo)))
    forged = {**metadata}
    del forged["light_field_grid"]
    forged["content_sha256"] = _content_hash(data, forged)
    with pytest.raises(InstructionIntegrityError, match="light field"):
        load_instruction(data, forged, None)


def test_a_global_grade_gets_no_light_field(model, pairs):
    learned = learn_routed(model, pairs, LearnConfig(**FAST), RouteConfig(route="lut", lut_size=9), "warm")
    assert learned.light_field is None and learned.metadata["light_field"]["used"] is False
    assert "light_field_grid" not in save_instruction(learned)[1]
