"""Measure a model folder against the ground-truth transforms on photos it was not trained on.

Every figure is a PSNR in dB on [0, 1] images at the model's native resolution, named after what
produced it: `psnr_vae_recon` (encode + decode), `psnr_edit[id]` (ip2p output vs the transform's
output), `psnr_identity[id]` (the unedited photo vs the same target: the "do nothing" baseline),
`psnr_inversion_recon` (t2i: DDIM inversion with the base caption, guidance 1, then regeneration;
`psnr_inversion_recon_plain` the same without the inversion's fixed-point iterations)
and `psnr_caption_edit[id]` (t2i: inversion with the base caption, regeneration with the edit's
caption: the simplest inversion-based edit, a floor for FPE / SimInversion).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image
from torch import Tensor

from editing.inversion import FIXED_POINT_ITERATIONS, ddim_invert
from editing.metrics import psnr
from editing.models import LoadedModel, load_model
from editing.photos import sample_photos
from editing.transforms import resolve_transform

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
INVERSION_STEPS = 50


def photo_views(photo: np.ndarray, resolution: int) -> Tensor:
    """Five deterministic square views per photo: the centre square and its four quadrants.

    One photo gives five different framings, so three held-out photos already give 15 test images.
    """
    image = torch.from_numpy(photo).permute(2, 0, 1).float().div(255)[None]
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[..., top : top + side, left : left + side]
    half = side // 2
    crops = [square] + [square[..., y : y + half, x : x + half] for y in (0, half) for x in (0, half)]
    return torch.cat(
        [F.interpolate(c, size=(resolution, resolution), mode="bilinear", antialias=True) for c in crops]
    ).clamp(0, 1)


def load_photo_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every image file in a folder (not recursive), as HxWx3 uint8."""
    photos = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as img:
                photos[path.stem] = np.asarray(img.convert("RGB"))
    if not photos:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return photos


def _to_pil(images: Tensor) -> list[Image.Image]:
    arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def vae_reconstruct(model: LoadedModel, images: Tensor) -> Tensor:
    """Encode (posterior mode) and decode, [0, 1] in and out."""
    vae = model.pipe.vae
    with torch.no_grad():
        x = images.to(vae.device, vae.dtype) * 2 - 1
        return (vae.decode(vae.encode(x).latent_dist.mode()).sample.float().cpu() + 1) / 2


def _encode_prompt(model: LoadedModel, prompt: str, batch: int) -> Tensor:
    embeds, _ = model.pipe.encode_prompt(prompt, model.pipe.device, batch, False)
    return embeds


def invert_photos(
    model: LoadedModel,
    images: Tensor,
    prompt: str,
    steps: int = INVERSION_STEPS,
    fixed_point_iterations: int = FIXED_POINT_ITERATIONS,
) -> Tensor:
    """DDIM inversion (guidance 1) of [0, 1] images to the latent noise that regenerates them;
    `editing.inversion`, the same code the text edits use."""
    pipe = model.pipe
    with torch.no_grad():
        latents = pipe.vae.encode(images.to(pipe.device, pipe.vae.dtype) * 2 - 1).latent_dist.mode()
        latents = latents * pipe.vae.config.scaling_factor
        embeds = _encode_prompt(model, prompt, images.shape[0])
    inversion = ddim_invert(
        pipe.unet,
        pipe.scheduler.config,
        latents,
        embeds,
        num_inference_steps=steps,
        fixed_point_iterations=fixed_point_iterations,
    )
    return inversion.noise_latents


def ddim_generate(model: LoadedModel, latents: Tensor, prompt: str, steps: int = INVERSION_STEPS) -> Tensor:
    """Stock pipeline call from given start latents, guidance 1, DDIM; [0, 1] images out."""
    pipe = model.pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    size = latents.shape[-1] * pipe.vae_scale_factor
    out = pipe(
        [prompt] * latents.shape[0],
        height=size,
        width=size,
        latents=latents,
        guidance_scale=1.0,
        num_inference_steps=steps,
        output_type="pt",
    ).images
    return out.float().cpu()


def evaluate_model(
    path: str | Path,
    photos_dir: str | Path | None = None,
    kind: str | None = None,
    progress: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_photos: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Every figure of a model folder on held-out photos; needs the folder's edits.json.

    kind defaults to what the folder's edits.json and UNet say: 8 input channels is ip2p.
    `steps` overrides the sampler steps (default: the card's, `edits.json` for ip2p and 50 for
    the t2i's inversion and regeneration); fewer steps give a quick check, not the card's figures.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    started = time.monotonic()
    say: Callable[[str], None] = print if progress else (lambda _: None)
    path = Path(path)
    if kind is None:
        unet_config = (path / "unet" / "config.json").read_text()
        kind = "ip2p" if '"in_channels": 8' in unet_config else "t2i"
    model = load_model(path, kind=kind, device=device, dtype=dtype)
    if model.spec is None:
        raise ValueError(f"{path}: no edits.json, so there is no ground truth to evaluate against")
    spec = model.spec
    resolution = int(spec["resolution"])
    photos = load_photo_folder(Path(photos_dir)) if photos_dir else sample_photos("heldout")
    names = sorted(photos)[:max_photos]
    images = torch.cat([photo_views(photos[name], resolution) for name in names])
    defaults = spec["defaults"]
    if steps is None:
        steps = int(defaults["num_inference_steps"]) if kind == "ip2p" else INVERSION_STEPS
    generator_seed = 0
    figures: dict[str, Any] = {
        "model_id": model.model_id,
        "sha256": model.sha256,
        "kind": kind,
        "resolution": resolution,
        "photos": names,
        "n_images": int(images.shape[0]),
        "settings": defaults,
        "steps": steps,
    }
    say(f"{model.model_id}: {len(names)} photos, {images.shape[0]} views at {resolution} px")
    figures["psnr_vae_recon"] = psnr(vae_reconstruct(model, images), images)
    say(f"vae reconstruction {figures['psnr_vae_recon']:.2f} dB")

    edit_psnr: dict[str, float] = {}
    identity_psnr: dict[str, float] = {}
    if kind == "t2i":
        caption = spec["base_caption"]
        plain = invert_photos(model, images, caption, steps, fixed_point_iterations=0)
        figures["psnr_inversion_recon_plain"] = psnr(ddim_generate(model, plain, caption, steps), images)
        inverted = invert_photos(model, images, caption, steps)
        figures["inversion_fixed_point_iterations"] = FIXED_POINT_ITERATIONS
        figures["psnr_inversion_recon"] = psnr(ddim_generate(model, inverted, caption, steps), images)
        say(
            f"DDIM inversion + reconstruction {figures['psnr_inversion_recon']:.2f} dB "
            f"({FIXED_POINT_ITERATIONS} fixed-point iterations; plain DDIM inversion "
            f"{figures['psnr_inversion_recon_plain']:.2f} dB)"
        )
    for i, edit in enumerate(spec["edits"]):
        target = resolve_transform(edit["transform"])(images).clamp(0, 1)
        identity_psnr[edit["id"]] = psnr(images, target)
        if kind == "ip2p":
            generator = torch.Generator("cpu").manual_seed(generator_seed)
            prompts = [edit["phrasings"][j % len(edit["phrasings"])] for j in range(images.shape[0])]
            output = (
                model.pipe(
                    prompts,
                    image=_to_pil(images),
                    generator=generator,
                    output_type="pt",
                    num_inference_steps=steps,
                    guidance_scale=defaults["guidance_scale"],
                    image_guidance_scale=defaults["image_guidance_scale"],
                )
                .images.float()
                .cpu()
            )
        else:
            output = ddim_generate(model, inverted, edit["caption"], steps)
        edit_psnr[edit["id"]] = psnr(output, target)
        say(
            f"[{i + 1}/{len(spec['edits'])}] {edit['id']}: {edit_psnr[edit['id']]:.2f} dB "
            f"(identity {identity_psnr[edit['id']]:.2f} dB)"
        )
    key = "psnr_edit" if kind == "ip2p" else "psnr_caption_edit"
    figures[key] = edit_psnr
    figures["psnr_identity"] = identity_psnr
    figures[f"{key}_mean"] = float(np.mean(list(edit_psnr.values())))
    figures["psnr_identity_mean"] = float(np.mean(list(identity_psnr.values())))
    figures[f"{key}_min_margin"] = min(edit_psnr[k] - identity_psnr[k] for k in edit_psnr)
    figures["seconds"] = round(time.monotonic() - started, 1)
    # The settings are the card's own values (some with 4 decimals), quoted as they are.
    return {k: v if k == "settings" else _rounded(v) for k, v in figures.items()}


def _rounded(value: Any) -> Any:
    """Two decimals for the JSON line; dB figures are not meaningful beyond that."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 2)
    return value
