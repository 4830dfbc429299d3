"""InstructPix2Pix building blocks shared by instruction scoring, learning and application.

They reproduce what the stock `StableDiffusionInstructPix2PixPipeline` does (text encoding, the
unscaled image-conditioning latents, the scaled target latents) so that an instruction learned
here means the same thing to the stock pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def pil_to_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def tensor_to_pil(image: Tensor) -> Image.Image:
    """Round like the stock pipeline's postprocess (x * 255, round)."""
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def to_native(images: Tensor, resolution: int) -> Tensor:
    """Area-downsample (B, 3, H, W) to the model's square native size (area keeps colours exact)."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="area")


def encode_text(pipe, texts: Sequence[str]) -> Tensor:
    """(n, L, D) encoder hidden states, padded to the tokenizer's max length like the pipeline."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    tokens = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=mask)[0]


def count_instruction_tokens(pipe, text: str) -> int:
    """Number of tokens between BOS and EOS (after truncation to the context length)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return len(ids) - 2


def encode_pairs(pipe, before: Tensor, after: Tensor) -> tuple[Tensor, Tensor]:
    """(conditioning latents of `before`, unscaled mode; target latents of `after`, scaled mean).

    IP2P conditions on the unscaled mode of the source latents but denoises scaled latents.
    """
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        cond = vae.encode((before * 2 - 1).to(vae.device, dtype)).latent_dist.mode()
        target = vae.encode((after * 2 - 1).to(vae.device, dtype)).latent_dist.mean
    return cond, target * vae.config.scaling_factor


def denoising_target(scheduler, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet should output, by the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def denoising_loss(
    unet,
    scheduler,
    cond_latents: Tensor,
    target_latents: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    encoder_hidden_states: Tensor,
) -> Tensor:
    """Per-row IP2P denoising loss (mean squared error over latent elements), shape (B,).

    Uses the training scheduler's `add_noise`, so it is the loss the model was trained with.
    """
    noisy = scheduler.add_noise(target_latents, noise, timesteps)
    prediction = unet(torch.cat([noisy, cond_latents], dim=1), timesteps, encoder_hidden_states).sample
    target = denoising_target(scheduler, target_latents, noise, timesteps)
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)


@contextmanager
def channels_last(module: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run `module`'s convolutions in channels-last memory format, restoring its format on exit.

    Numerically the same computation (outputs within 3e-6) with faster convolutions on CPU (the
    measured step times are in benchmarks/README.md). Yields whether it is active.
    """
    convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    already = bool(convs) and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    if not enabled or not convs or already:
        yield enabled and already
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        module.to(memory_format=torch.contiguous_format)
