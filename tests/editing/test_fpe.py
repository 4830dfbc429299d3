"""FPE: exactly the configured self-attention layers get the source maps, for the configured
steps; cross-attention is untouched; the source row follows the inversion trajectory."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from editing.attention import FreePromptEdit, SelfLayerSelection, attention_control
from editing.fpe import fpe_edit
from editing.inversion import ddim_invert
from editing.text_edit import GuidanceStep, encode_images, encode_prompts, guided_ddim_sample

STEPS = 5
LATENT_TOKENS = 16 * 16  # tiny model: 32 px images, x2 VAE


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _record(pipe: StableDiffusionPipeline, controller: FreePromptEdit) -> list[dict[str, list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 16, 16, generator=generator)
    uncond, source, target = encode_prompts(pipe, ["", "a photo", "a sepia photo"]).split(1)
    with attention_control(pipe.unet, controller):
        guided_ddim_sample(
            pipe.unet,
            pipe.scheduler.config,
            noise,
            [source, target],
            uncond,
            [7.5, 7.5],
            STEPS,
            controller=controller,
        )
    return controller.history


def _self_maps_in_call_order(step: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    # execution order of the tiny UNet: down, mid, up (each key's list is in call order)
    return step["down_self"] + step["mid_self"] + step["up_self"]


def test_fpe_replaces_exactly_the_small_self_attention_layers(pipe: StableDiffusionPipeline) -> None:
    controller = FreePromptEdit(
        STEPS, LATENT_TOKENS, self_replace_steps=0.8, record_maps=True, keep_every_step=True
    )
    history = _record(pipe, controller)
    assert len(history) == STEPS
    edited_steps = int(STEPS * 0.8)
    # from step 1 on: at step 0 both rows start from the same noise, so the first layer's maps
    # coincide without any copying
    for step_index, step in enumerate(history[1:], start=1):
        self_maps = _self_maps_in_call_order(step)
        assert len(self_maps) == 7
        for maps in self_maps:
            small = maps.shape[2] <= LATENT_TOKENS // 4
            copied = torch.equal(maps[1], maps[0])
            assert copied == (small and step_index < edited_steps), (step_index, maps.shape)
        for key in ("down_cross", "mid_cross", "up_cross"):
            for maps in step[key]:
                assert not torch.allclose(maps[1], maps[0])
    # the tiny UNet has 4 small layers (8x8) and 3 full-size ones (16x16)
    assert sum(m.shape[2] <= LATENT_TOKENS // 4 for m in _self_maps_in_call_order(history[0])) == 4


def test_fpe_layer_indices_option_selects_by_execution_order(pipe: StableDiffusionPipeline) -> None:
    chosen = {0, 5}
    controller = FreePromptEdit(
        STEPS,
        LATENT_TOKENS,
        self_layers=SelfLayerSelection.by_index(chosen),
        record_maps=True,
        keep_every_step=True,
    )
    second_step = _record(pipe, controller)[1]
    copied = [torch.equal(m[1], m[0]) for m in _self_maps_in_call_order(second_step)]
    assert [i for i, c in enumerate(copied) if c] == sorted(chosen)


def test_fpe_drives_the_source_row_along_the_inversion(
    pipe: StableDiffusionPipeline, image: torch.Tensor
) -> None:
    latents = encode_images(pipe, image)
    uncond, target = encode_prompts(pipe, ["", "a sepia photo"]).split(1)
    inversion = ddim_invert(pipe.unet, pipe.scheduler.config, latents, uncond, uncond, STEPS, 7.5)
    seen: list[GuidanceStep] = []
    controller = FreePromptEdit(STEPS, LATENT_TOKENS)
    with attention_control(pipe.unet, controller):
        guided_ddim_sample(
            pipe.unet,
            pipe.scheduler.config,
            inversion.noise_latents,
            [uncond, target],
            uncond,
            [7.5, 7.5],
            STEPS,
            controller=controller,
            source_trajectory=inversion,
            on_step=seen.append,
        )
    assert len(seen) == STEPS
    for step in seen:
        torch.testing.assert_close(
            step.latents[:1], inversion.latents_before_step(step.step_index), rtol=0, atol=0
        )


def test_fpe_edit_returns_images_and_restores_processors(
    pipe: StableDiffusionPipeline, image: torch.Tensor
) -> None:
    before = pipe.unet.attn_processors
    result = fpe_edit(pipe, image=image, target_prompt="a sepia photo", num_inference_steps=STEPS)
    assert result.images.shape == image.shape
    assert torch.isfinite(result.images).all() and 0 <= result.images.min() and result.images.max() <= 1
    assert result.params["inversion_prompt"] == "" and result.params["controller"] == "FreePromptEdit"
    assert len(result.inversion.trajectory) == STEPS + 1
    assert all(pipe.unet.attn_processors[name] is before[name] for name in before)
