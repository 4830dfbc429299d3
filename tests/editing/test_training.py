"""The training recipe: prediction targets, reproducibility and the saved folder's scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from editing.instruct.ops import denoising_target
from editing.training import (
    PREDICTION_TYPES,
    _caption_groups,
    build_pipeline,
    new_vae,
    train_unet,
    training_scheduler,
)
from editing.transforms import EDITS
from tests.tiny_models import build_tokenizer


def test_objective_matches_each_parameterisation() -> None:
    clean, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 400, 999])
    alphas = training_scheduler().alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.equal(denoising_target(training_scheduler("sample"), clean, noise, timesteps), clean)
    assert torch.equal(denoising_target(training_scheduler("epsilon"), clean, noise, timesteps), noise)
    v = denoising_target(training_scheduler("v_prediction"), clean, noise, timesteps)
    torch.testing.assert_close(v, alphas.sqrt() * noise - (1 - alphas).sqrt() * clean)
    # v recovers the clean latent exactly from the noisy one: x0 = sqrt(a) x_t - sqrt(1 - a) v
    noisy = training_scheduler().add_noise(clean, noise, timesteps)
    torch.testing.assert_close(alphas.sqrt() * noisy - (1 - alphas).sqrt() * v, clean, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        denoising_target(
            training_scheduler("sample").from_config({"prediction_type": "x"}), clean, noise, timesteps
        )


def test_the_text_to_image_model_predicts_v_because_inversion_needs_it() -> None:
    assert PREDICTION_TYPES == {"ip2p": "sample", "t2i": "v_prediction"}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 120, 3), dtype=np.uint8) for _ in range(2)]


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_two_steps_are_seeded_and_the_saved_folder_loads_with_its_prediction_type(
    tmp_path: Path, photos: list[np.ndarray], prediction_type: str
) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        vae = new_vae()
        unet, text_encoder, log = train_unet(
            "t2i",
            vae,
            tokenizer,
            photos,
            minutes=5,
            seed=3,
            max_steps=2,
            batch_size=4,
            prediction_type=prediction_type,
        )
        runs.append((unet, log))
    assert runs[0][1].steps == 2
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
        assert torch.equal(a, b)
    folder = tmp_path / "model"
    build_pipeline("t2i", runs[0][0], vae, text_encoder, tokenizer, prediction_type).save_pretrained(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.scheduler.config.set_alpha_to_one is False
    out = pipe("a photo", height=64, width=64, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_caption_groups_show_each_crop_as_itself_and_under_distinct_edits() -> None:
    edit_ids, texts = _caption_groups(12, 4, torch.Generator().manual_seed(0))
    assert len(edit_ids) == len(texts) == 12
    for start in range(0, 12, 4):
        ids, captions = edit_ids[start : start + 4], texts[start : start + 4]
        assert ids[0] is None and captions[0] == "a photo"
        assert len(set(ids[1:])) == 3 and None not in ids[1:]
        assert captions[1:] == [EDITS[i].caption for i in ids[1:]]
    for bad in (1, 5, len(EDITS) + 2):
        with pytest.raises(ValueError, match="captions_per_crop"):
            _caption_groups(12, bad, torch.Generator())


def test_grouped_caption_training_steps_and_is_refused_for_the_editor(
    tmp_path: Path, photos: list[np.ndarray]
) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    vae = new_vae()
    unet, _, log = train_unet(
        "t2i", vae, tokenizer, photos, minutes=5, seed=0, max_steps=2, batch_size=8, captions_per_crop=4
    )
    assert log.steps == 2 and all(torch.isfinite(p).all() for p in unet.parameters())
    with pytest.raises(ValueError, match="t2i model only"):
        train_unet("ip2p", vae, tokenizer, photos, minutes=5, seed=0, max_steps=1, captions_per_crop=4)
