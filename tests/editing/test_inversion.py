"""DDIM inversion: the round trip is exact for any model whose noise or clean-sample prediction
ignores the latent (so the inverse and the sampler pair the same noise levels), closer than chance
for a random model, and the inversion's own guidance scale is honoured. (A constant v-prediction
is not a constant noise prediction, so the exact case does not exist for v.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from editing.inversion import ddim_invert, ddim_schedulers
from editing.text_edit import encode_images, encode_prompts, guided_ddim_sample

STEPS = 10


@pytest.fixture(scope="module")
def pipe(tiny_t2i_dir: Path) -> StableDiffusionPipeline:
    torch.set_num_threads(1)
    return StableDiffusionPipeline.from_pretrained(tiny_t2i_dir, safety_checker=None)


@pytest.fixture(scope="module")
def latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return encode_images(pipe, image)


def _round_trip(pipe: StableDiffusionPipeline, config, latents: torch.Tensor, prompt: str) -> torch.Tensor:
    uncond, cond = encode_prompts(pipe, ["", prompt]).split(1)
    inversion = ddim_invert(pipe.unet, config, latents, cond, uncond, STEPS, guidance_scale=1.0)
    assert len(inversion.trajectory) == STEPS + 1 and inversion.trajectory[0] is latents
    (reconstruction,) = guided_ddim_sample(
        pipe.unet, config, inversion.noise_latents, [cond], uncond, [1.0], STEPS
    )
    return reconstruction


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_round_trip_is_exact_when_the_prediction_ignores_the_latent(
    tiny_t2i_dir: Path, latents: torch.Tensor, prediction_type: str
) -> None:
    constant = StableDiffusionPipeline.from_pretrained(tiny_t2i_dir, safety_checker=None)
    with torch.no_grad():
        constant.unet.conv_out.weight.zero_()  # output = the conv bias, whatever the latent
    config = DDIMScheduler.from_config(constant.scheduler.config, prediction_type=prediction_type).config
    reconstruction = _round_trip(constant, config, latents, "a photo")
    assert torch.nn.functional.mse_loss(reconstruction, latents) < 1e-10


def test_round_trip_with_the_same_prompt_beats_starting_from_fresh_noise(
    pipe: StableDiffusionPipeline, latents: torch.Tensor
) -> None:
    """A random UNet's prediction depends on the latent, so the round trip is not exact; measured
    on this tiny model (10 steps) the reconstruction error is about 0.6 of that of sampling the same
    prompt from fresh noise of the same shape. The bound guards against index slips, which push the
    error to or above the fresh-noise baseline."""
    reconstruction = _round_trip(pipe, pipe.scheduler.config, latents, "a photo")
    uncond, cond = encode_prompts(pipe, ["", "a photo"]).split(1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    (unrelated,) = guided_ddim_sample(pipe.unet, pipe.scheduler.config, noise, [cond], uncond, [1.0], STEPS)
    error = torch.nn.functional.mse_loss(reconstruction, latents)
    baseline = torch.nn.functional.mse_loss(unrelated, latents)
    assert error < 0.75 * baseline


def test_inversion_guidance_uses_the_unconditional_prediction(
    pipe: StableDiffusionPipeline, latents: torch.Tensor
) -> None:
    uncond, cond = encode_prompts(pipe, ["", "a photo"]).split(1)
    plain = ddim_invert(pipe.unet, pipe.scheduler.config, latents, cond, uncond, 3, guidance_scale=1.0)
    guided = ddim_invert(pipe.unet, pipe.scheduler.config, latents, cond, uncond, 3, guidance_scale=0.5)
    assert not torch.allclose(plain.noise_latents, guided.noise_latents)
    # the empty prompt against itself: guidance cannot matter (FPE's inversion)
    empty_1 = ddim_invert(pipe.unet, pipe.scheduler.config, latents, uncond, uncond, 3, guidance_scale=1.0)
    empty_7 = ddim_invert(pipe.unet, pipe.scheduler.config, latents, uncond, uncond, 3, guidance_scale=7.5)
    torch.testing.assert_close(empty_1.noise_latents, empty_7.noise_latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uncond"):
        ddim_invert(pipe.unet, pipe.scheduler.config, latents, cond, None, 3, guidance_scale=0.5)


def test_schedulers_refuse_clipping_and_never_start_from_alpha_one(pipe: StableDiffusionPipeline) -> None:
    sampler, inverse = ddim_schedulers(pipe.scheduler.config)
    assert not sampler.config.set_alpha_to_one and not inverse.config.set_alpha_to_one
    assert inverse.config.prediction_type == pipe.scheduler.config.prediction_type
    with pytest.raises(ValueError, match="clip_sample"):
        ddim_schedulers(DDIMScheduler(clip_sample=True).config)
