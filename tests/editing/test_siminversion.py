"""SimInversion: each branch gets its own guidance scale, the classic DDIM+P2P setting is the
same function with other arguments, and any prediction type runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from editing.attention import CrossAttentionRefine, CrossAttentionReplace
from editing.p2p import ddim_p2p_edit, p2p_controller
from editing.siminversion import siminversion_edit
from editing.text_edit import GuidanceStep, encode_prompts, guided_ddim_sample

STEPS = 4


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_guidance_is_applied_per_branch(pipe: StableDiffusionPipeline) -> None:
    batch = 2
    noise = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    uncond, source, target = encode_prompts(pipe, ["", "a photo", "a sepia photo"]).split(1)
    seen: list[GuidanceStep] = []
    guided_ddim_sample(
        pipe.unet,
        pipe.scheduler.config,
        noise,
        [source, target],
        uncond,
        [1.0, 7.5],
        STEPS,
        on_step=seen.append,
    )
    assert len(seen) == STEPS
    for step in seen:
        # w_src = 1: the source rows are the pure conditional prediction
        torch.testing.assert_close(step.guided[:batch], step.cond[:batch])
        expected = step.uncond[batch:] + 7.5 * (step.cond[batch:] - step.uncond[batch:])
        torch.testing.assert_close(step.guided[batch:], expected)
        assert not torch.allclose(step.guided[batch:], step.cond[batch:])


def test_classic_setting_reproduces_ddim_p2p(pipe: StableDiffusionPipeline, image: torch.Tensor) -> None:
    args = {
        "image": image,
        "source_prompt": "a photo",
        "target_prompt": "a sepia photo",
        "num_inference_steps": STEPS,
    }
    baseline = ddim_p2p_edit(pipe, **args)
    classic = siminversion_edit(pipe, **args, w_inv=1.0, w_src=7.5, w_tgt=7.5, inversion_iterations=2)
    torch.testing.assert_close(classic.images, baseline.images, rtol=0, atol=0)
    default = siminversion_edit(pipe, **args)
    assert (default.params["w_inv"], default.params["w_src"], default.params["w_tgt"]) == (0.5, 0.5, 7.5)
    assert not torch.allclose(default.images, baseline.images)


def test_p2p_controller_replaces_equal_lengths_and_refines_others(pipe: StableDiffusionPipeline) -> None:
    same = p2p_controller(pipe, "a red car", "a tan car", 10, 256)
    different = p2p_controller(pipe, "a photo", "a sepia photo", 10, 256)
    assert isinstance(same, CrossAttentionReplace) and isinstance(different, CrossAttentionRefine)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_siminversion_runs_with_other_prediction_types(
    tiny_t2i_dir: Path, image: torch.Tensor, prediction_type: str
) -> None:
    other = StableDiffusionPipeline.from_pretrained(tiny_t2i_dir, safety_checker=None)
    other.scheduler = DDIMScheduler.from_config(other.scheduler.config, prediction_type=prediction_type)
    result = siminversion_edit(
        other, image=image, source_prompt="a photo", target_prompt="a sepia photo", num_inference_steps=STEPS
    )
    assert result.images.shape == image.shape and torch.isfinite(result.images).all()


def test_inversion_iterations_reach_the_inversion_and_are_recorded(
    pipe: StableDiffusionPipeline, image: torch.Tensor
) -> None:
    kwargs = {
        "image": image,
        "source_prompt": "a photo",
        "target_prompt": "a sepia photo",
        "num_inference_steps": 3,
    }
    plain = siminversion_edit(
        pipe, generator=torch.Generator().manual_seed(0), inversion_iterations=0, **kwargs
    )
    refined = siminversion_edit(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    assert plain.params["inversion_fixed_point_iterations"] == 0
    assert refined.params["inversion_fixed_point_iterations"] == 1  # SimInversion's default
    assert ddim_p2p_edit(pipe, **kwargs).params["inversion_fixed_point_iterations"] == 2
    torch.testing.assert_close(plain.inversion.trajectory[0], refined.inversion.trajectory[0])
    assert not torch.allclose(plain.inversion.noise_latents, refined.inversion.noise_latents)
