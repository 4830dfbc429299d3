"""FPE, Free-Prompt-Editing (Liu et al., CVPR 2024): only self-attention maps are shared.

The photo is inverted with the empty prompt (no source caption needed), the source row is pinned
to the inversion trajectory at every step, and for the first 80% of the steps the target row
attends with the source's self-attention probabilities in the layers with at most a quarter of
the latent's tokens; cross-attention is never touched, so the target prompt alone says what the
content becomes while the source's self-attention keeps the layout.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from editing.attention import FreePromptEdit, SelfLayerSelection
from editing.inversion import FIXED_POINT_ITERATIONS
from editing.models import LoadedModel
from editing.text_edit import TextEditResult, pipeline_and_spec, resolve_text_edit, run_text_edit


def fpe_edit(
    model: LoadedModel | StableDiffusionPipeline,
    *,
    image: Tensor,
    target_prompt: str,
    source_prompt: str = "",
    num_inference_steps: int | None = None,
    w_src: float | None = None,
    w_tgt: float | None = None,
    self_replace_steps: float = 0.8,
    self_layers: SelfLayerSelection | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    inversion_iterations: int = FIXED_POINT_ITERATIONS,
) -> TextEditResult:
    """Edit (B, 3, h, w) images in [0, 1] at the model's resolution towards `target_prompt`.

    `source_prompt` conditions the source row only (the official code uses ""); the inversion
    always uses the empty prompt, so no inversion guidance scale exists here.
    `self_layers=SelfLayerSelection.by_index(FPE_PAPER_LAYERS)` gives the paper's "layers 4-14".
    `model` is a `LoadedModel` or a pipeline; steps and scales left None come from
    `resolve_text_edit("fpe", ...)`: the model folder's edits.json, else the official code's 7.5
    for both rows, 50 steps.
    """
    pipe, spec = pipeline_and_spec(model)
    settings = resolve_text_edit(
        "fpe", spec, num_inference_steps=num_inference_steps, w_src=w_src, w_tgt=w_tgt
    )
    steps = int(settings.values["num_inference_steps"])
    result = run_text_edit(
        pipe,
        image=image,
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        inversion_prompt="",
        num_inference_steps=steps,
        w_inv=1.0,
        w_src=settings.values["w_src"],
        w_tgt=settings.values["w_tgt"],
        make_controller=lambda latent_tokens: FreePromptEdit(
            steps, latent_tokens, self_replace_steps, self_layers
        ),
        drive_source=True,
        generator=generator,
        device=device,
        dtype=dtype,
        inversion_iterations=inversion_iterations,
    )
    result.params["defaults_origin"] = settings.origin
    return result
