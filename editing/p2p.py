"""DDIM+P2P: the classic baseline of real-image text editing (PIE-Bench's "DDIM + P2P").

DDIM inversion with the source prompt and no guidance, then [source, target] sampling at the same
guidance for both rows (PIE-Bench: 7.5; a model folder may declare its own, see
`editing.text_edit.resolve_text_edit`) under a prompt-to-prompt controller. SimInversion keeps all of this and
changes only the guidance scales, so the controller choice lives here and is shared.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from editing.attention import (
    AttentionEdit,
    CrossAttentionRefine,
    CrossAttentionReplace,
    SelfLayerSelection,
    align_tokens,
)
from editing.inversion import FIXED_POINT_ITERATIONS
from editing.models import LoadedModel
from editing.text_edit import (
    TextEditResult,
    TextEditSettings,
    pipeline_and_spec,
    resolve_text_edit,
    run_text_edit,
)


def p2p_controller(
    pipe: StableDiffusionPipeline,
    source_prompt: str,
    target_prompt: str,
    num_steps: int,
    latent_tokens: int,
    cross_replace_steps: float = 0.4,
    self_replace_steps: float = 0.6,
) -> AttentionEdit:
    """Replace for prompts of equal token count (a word swap), Refine otherwise (words added or
    removed). Self-attention is replaced in the layers with at most a quarter of the latent's
    tokens, PIE-Bench's 32**2 at SD's 64x64 latents."""
    tokenizer = pipe.tokenizer
    source_ids = tokenizer(source_prompt).input_ids
    target_ids = tokenizer(target_prompt).input_ids
    layers = SelfLayerSelection()
    if len(source_ids) == len(target_ids):
        return CrossAttentionReplace(
            num_steps, latent_tokens, cross_replace_steps, self_replace_steps, layers
        )
    mapper, alphas = align_tokens(source_ids, target_ids, tokenizer.model_max_length)
    return CrossAttentionRefine(
        num_steps, latent_tokens, mapper, alphas, cross_replace_steps, self_replace_steps, layers
    )


def ddim_p2p_edit(
    model: LoadedModel | StableDiffusionPipeline,
    *,
    image: Tensor,
    source_prompt: str,
    target_prompt: str,
    num_inference_steps: int | None = None,
    w_inv: float | None = None,
    w_src: float | None = None,
    w_tgt: float | None = None,
    cross_replace_steps: float = 0.4,
    self_replace_steps: float = 0.6,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    inversion_iterations: int = FIXED_POINT_ITERATIONS,
) -> TextEditResult:
    """Edit (B, 3, h, w) images in [0, 1] at the model's resolution from `source_prompt` (what the
    photo shows) to `target_prompt`. `model` is a `LoadedModel` or a pipeline; steps and scales
    left None come from `resolve_text_edit("ddim_p2p", ...)`: the model folder's edits.json, else
    PIE-Bench's DDIM+P2P run (1 / 7.5 / 7.5, 50 steps)."""
    pipe, spec = pipeline_and_spec(model)
    settings = resolve_text_edit(
        "ddim_p2p", spec, num_inference_steps=num_inference_steps, w_inv=w_inv, w_src=w_src, w_tgt=w_tgt
    )
    return run_p2p(
        pipe,
        settings,
        image=image,
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        cross_replace_steps=cross_replace_steps,
        self_replace_steps=self_replace_steps,
        generator=generator,
        device=device,
        dtype=dtype,
        inversion_iterations=inversion_iterations,
    )


def run_p2p(
    pipe: StableDiffusionPipeline,
    settings: TextEditSettings,
    *,
    image: Tensor,
    source_prompt: str,
    target_prompt: str,
    cross_replace_steps: float,
    self_replace_steps: float,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    inversion_iterations: int,
) -> TextEditResult:
    """Inversion with the source prompt, [source, target] sampling under the P2P controller, with
    resolved `settings` (DDIM+P2P's or SimInversion's); records where each setting came from."""
    num_inference_steps = int(settings.values["num_inference_steps"])
    result = run_text_edit(
        pipe,
        image=image,
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        inversion_prompt=source_prompt,
        num_inference_steps=num_inference_steps,
        w_inv=settings.values["w_inv"],
        w_src=settings.values["w_src"],
        w_tgt=settings.values["w_tgt"],
        make_controller=lambda latent_tokens: p2p_controller(
            pipe,
            source_prompt,
            target_prompt,
            num_inference_steps,
            latent_tokens,
            cross_replace_steps,
            self_replace_steps,
        ),
        drive_source=False,
        generator=generator,
        device=device,
        dtype=dtype,
        inversion_iterations=inversion_iterations,
    )
    result.params["defaults_origin"] = settings.origin
    return result
