"""DDIM inversion: walk a photo's latent up the noise levels so that DDIM sampling walks it back.

Every tuning-free text edit starts here. The whole trajectory is kept because the source branch of
an edit may be driven along it (FPE), and because its end is the noise the edit starts from.
Schedulers are built from the model's own scheduler configuration; the model may predict noise,
the clean sample or v, and the scheduler's `prediction_type` handles the conversion, which is why
guidance is applied to raw model outputs (it is an affine combination at one latent, so it means
the same in any of the three parameterisations).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from torch import Tensor


def ddim_schedulers(scheduler_config: Mapping[str, Any]) -> tuple[DDIMScheduler, DDIMInverseScheduler]:
    """The sampler and its exact inverse, from a model's scheduler configuration.

    `clip_sample` would clamp predictions and break the inversion round trip, so it is refused.
    `set_alpha_to_one=False` is forced on both: the inverse then starts from the same level the
    sampler ends at (alphas_cumprod[0]), and an x0-predicting model does not divide by zero on
    the first inverse step (diffusers issue #10920).
    """
    if scheduler_config.get("clip_sample", False):
        raise ValueError(
            "scheduler config has clip_sample=True, which breaks DDIM inversion; set it to False"
        )
    sampler = DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=False)
    inverse = DDIMInverseScheduler.from_config(scheduler_config, set_alpha_to_one=False)
    return sampler, inverse


def guide(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance; `scale` may be one number per row (shape (rows, 1, 1, 1))."""
    return uncond + scale * (cond - uncond)


@dataclass
class Inversion:
    """The latents of one inversion run, clean first: `trajectory[0]` is the encoded photo,
    `trajectory[-1]` the noise; `trajectory[k]` sits at noise level `timesteps[k - 1]`."""

    trajectory: list[Tensor]
    timesteps: Tensor
    guidance_scale: float

    @property
    def noise_latents(self) -> Tensor:
        return self.trajectory[-1]

    def latents_before_step(self, step_index: int) -> Tensor:
        """The inverted latent a DDIM sampler holds before its `step_index`-th step (0 = first)."""
        return self.trajectory[len(self.trajectory) - 1 - step_index]


@torch.no_grad()
def ddim_invert(
    unet: UNet2DConditionModel,
    scheduler_config: Mapping[str, Any],
    latents: Tensor,
    prompt_embeds: Tensor,
    uncond_embeds: Tensor | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
) -> Inversion:
    """Invert clean `latents` (B, C, h, w) with DDIM.

    `guidance_scale` is the inversion pass's own scale (SimInversion's w_inv): 1 uses the
    conditional prediction only (P2P, PIE-Bench), anything else classifier-free guidance against
    `uncond_embeds` (the empty prompt). When prompt and unconditional embeddings are identical
    (FPE inverts with the empty prompt) the scale cannot matter and one UNet pass is used.
    Embeddings may have batch 1 (shared by all images) or B.
    """
    batch = latents.shape[0]
    cond = prompt_embeds.expand(batch, -1, -1)
    needs_uncond = guidance_scale != 1.0 and not (
        uncond_embeds is not None and torch.equal(uncond_embeds.expand_as(prompt_embeds), prompt_embeds)
    )
    if needs_uncond and uncond_embeds is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_embeds")
    _, inverse = ddim_schedulers(scheduler_config)
    inverse.set_timesteps(num_inference_steps, device=latents.device)
    context = torch.cat([uncond_embeds.expand(batch, -1, -1), cond]) if needs_uncond else cond

    trajectory = [latents]
    for t in inverse.timesteps:
        if needs_uncond:
            out_uncond, out_cond = unet(
                torch.cat([latents, latents]), t, encoder_hidden_states=context
            ).sample.chunk(2)
            model_output = guide(out_uncond, out_cond, guidance_scale)
        else:
            model_output = unet(latents, t, encoder_hidden_states=context).sample
        latents = inverse.step(model_output, t, latents).prev_sample
        trajectory.append(latents)
    return Inversion(trajectory=trajectory, timesteps=inverse.timesteps, guidance_scale=guidance_scale)
