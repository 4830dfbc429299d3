"""The machinery shared by the tuning-free text edits (DDIM+P2P, SimInversion, FPE).

All three invert the photo with DDIM and then sample two rows from the inverted noise in one
batched UNet call per step: row 0 reconstructs the photo under the source prompt, row 1 edits it
under the target prompt, and an attention controller lets the target reuse the source's maps.
They differ only in the guidance of each row and of the inversion, in the controller, and in
whether the source row is pinned to the inversion trajectory; `run_text_edit` takes those as
arguments so that each method module is a short statement of its choices.

Which guidance (and how many steps) an edit uses when the caller does not say is the model's
business, not the method's: `resolve_text_edit` takes each value from the caller, else from the
model folder's edits.json (`defaults.text_edit`), else from the papers (`PAPER_DEFAULTS`, tuned
for Stable Diffusion 1.x). Schema of the model folder's block, every key optional:

    "defaults": {"text_edit": {
        "num_inference_steps": 50,
        "ddim_p2p":     {"w_inv": 1.0, "w_src": 2.0, "w_tgt": 2.0},
        "siminversion": {"w_inv": 0.5, "w_src": 0.5, "w_tgt": 2.0},
        "fpe":          {"w_src": 2.0, "w_tgt": 2.0},
        "regenerate":   {"w_inv": 1.0, "w_tgt": 2.0},
        "carry":        "colour",
        "calibration":  {...free-form note: what was measured, on which photos...}
    }}

`carry` ("lift" or "colour") is how the native-size edit reaches the photo's resolution for
captions the model does not list; `editing.carry.resolve_carry` reads it (and per-caption `carry`
keys of `edits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from editing.attention import AttentionController, attention_control
from editing.carry import check_carry
from editing.inversion import FIXED_POINT_ITERATIONS, Inversion, ddim_invert, ddim_sampler, guide
from editing.models import LoadedModel, read_spec

# The papers' settings, for Stable Diffusion 1.x (a folder without edits.json gets these).
# DDIM+P2P as PIE-Bench runs it: inversion with the source prompt on the conditional prediction
# alone (w = 1), then one guidance scale, 7.5, for both the source and the target row.
# SimInversion (arXiv 2409.10476): 0.5 shared by the inversion and the source branch, the target
# at PIE-Bench's 7.5 (see editing/siminversion.py for how "0.5" is read).
# FPE (official notebook for real photos): inversion with the empty prompt (its scale cannot
# matter), then one scale, 7.5, for both rows, the source row pinned to the inversion.
# Plain regeneration (the no-control baseline) inverts like DDIM+P2P and samples like it.
PAPER_STEPS = 50
PAPER_DEFAULTS: dict[str, dict[str, float]] = {
    "ddim_p2p": {"w_inv": 1.0, "w_src": 7.5, "w_tgt": 7.5},
    "siminversion": {"w_inv": 0.5, "w_src": 0.5, "w_tgt": 7.5},
    "fpe": {"w_src": 7.5, "w_tgt": 7.5},
    "regenerate": {"w_inv": 1.0, "w_tgt": 7.5},
}
TEXT_EDIT_METHODS = tuple(PAPER_DEFAULTS)
_NOTE_KEYS = {"calibration", "carry_calibration"}


@dataclass(frozen=True)
class TextEditSettings:
    """What a text edit runs with: `values` (num_inference_steps and the method's guidance scales,
    ready to pass as keyword arguments) and, per value, where it came from: "caller", "model"
    (the folder's edits.json) or "paper"."""

    method: str
    values: dict[str, float | int]
    origin: dict[str, str]

    def record(self) -> dict[str, Any]:
        """The values plus their origins, for a JSON summary or a manifest's `params`."""
        return {**self.values, "defaults_origin": dict(self.origin)}


def _number(value: Any, where: str, *, steps: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if steps:
        if int(value) != value or value < 1:
            raise ValueError(f"{where} must be a whole number >= 1, got {value!r}")
        return int(value)
    if value < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return float(value)


def model_text_edit_defaults(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `defaults.text_edit` block of a model's edits.json ({} without one), checked: only known
    methods and, per method, only the scales it has, all finite and >= 0."""
    block = ((spec or {}).get("defaults") or {}).get("text_edit") or {}
    name = (spec or {}).get("model", "model")
    if not isinstance(block, Mapping):
        raise TypeError(f"{name}: edits.json defaults.text_edit must be an object")
    for key, value in block.items():
        where = f"{name}: edits.json defaults.text_edit.{key}"
        if key == "num_inference_steps":
            _number(value, where, steps=True)
        elif key == "carry":
            check_carry(value, where)
        elif key in PAPER_DEFAULTS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where} must be an object of guidance scales")
            for scale, number in value.items():
                if scale not in PAPER_DEFAULTS[key]:
                    raise ValueError(f"{where}.{scale}: {key} has only {sorted(PAPER_DEFAULTS[key])}")
                _number(number, f"{where}.{scale}")
        elif key not in _NOTE_KEYS:
            raise ValueError(
                f"{where}: unknown key; expected num_inference_steps, carry, {', '.join(TEXT_EDIT_METHODS)}"
            )
    return dict(block)


def resolve_text_edit(
    method: str, spec: Mapping[str, Any] | None = None, **overrides: float | None
) -> TextEditSettings:
    """The steps and guidance scales of a text edit: each from the caller (`overrides` that are not
    None), else the model folder's edits.json `defaults.text_edit` (per method; steps shared),
    else the papers (`PAPER_DEFAULTS`, `PAPER_STEPS`). `spec` is `LoadedModel.spec` (None for a
    folder without edits.json). Pure: reads nothing.

    >>> resolve_text_edit("siminversion").values
    {'num_inference_steps': 50, 'w_inv': 0.5, 'w_src': 0.5, 'w_tgt': 7.5}
    """
    if method not in PAPER_DEFAULTS:
        raise ValueError(f"method must be one of {TEXT_EDIT_METHODS}, got {method!r}")
    allowed = {"num_inference_steps", *PAPER_DEFAULTS[method]}
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in allowed)
    if unknown:
        raise ValueError(f"{method} has no {', '.join(unknown)}; its settings are {sorted(allowed)}")
    block = model_text_edit_defaults(spec)
    model = {
        **({"num_inference_steps": block["num_inference_steps"]} if "num_inference_steps" in block else {}),
        **block.get(method, {}),
    }
    paper = {"num_inference_steps": PAPER_STEPS, **PAPER_DEFAULTS[method]}
    values: dict[str, float | int] = {}
    origin: dict[str, str] = {}
    for key, fallback in paper.items():
        steps = key == "num_inference_steps"
        if overrides.get(key) is not None:
            values[key], origin[key] = _number(overrides[key], key, steps=steps), "caller"
        elif key in model:
            values[key], origin[key] = _number(model[key], key, steps=steps), "model"
        else:
            values[key], origin[key] = fallback, "paper"
    return TextEditSettings(method=method, values=values, origin=origin)


def pipeline_and_spec(
    model: LoadedModel | StableDiffusionPipeline,
) -> tuple[StableDiffusionPipeline, dict | None]:
    """The pipeline to run and the edits.json of its folder: a `LoadedModel` carries both; a bare
    pipeline loaded from a local folder (`from_pretrained(folder)`, or `LoadedModel.pipe`) gets the
    spec of that folder through `editing.models.read_spec`; anything else has none."""
    if isinstance(model, LoadedModel):
        return model.pipe, model.spec
    folder = getattr(model, "name_or_path", None)
    return model, read_spec(folder) if folder else None


@dataclass
class TextEditResult:
    """`images`: the edits (B, 3, h, w) in [0, 1] at the model's resolution; `reconstructions`:
    the source row decoded (how faithfully the method retraced the photo); `params`: everything
    needed to replay the edit (for the manifest)."""

    images: Tensor
    reconstructions: Tensor
    inversion: Inversion
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuidanceStep:
    """What the sampler combined at one step; passed to `on_step` observers (tests, diagnostics).
    `latents` is what the UNet saw; rows are `[row 0 of every image..., row 1 of every image...]`."""

    step_index: int
    timestep: Tensor
    latents: Tensor
    uncond: Tensor
    cond: Tensor
    guided: Tensor


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> Tensor:
    """Text embeddings (len(prompts), L, D), padded to the tokenizer's length as the UNet was trained."""
    tokens = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(tokens)[0].to(pipe.unet.dtype)


@torch.no_grad()
def encode_images(
    pipe: StableDiffusionPipeline,
    images: Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Tensor:
    """Latents of (B, 3, h, w) images in [0, 1]: the posterior mean, or a posterior sample drawn
    with `generator` (as diffusers' inversion pipelines do), scaled by the VAE's scaling factor."""
    pixels = images.to(device=pipe.vae.device, dtype=pipe.vae.dtype) * 2 - 1
    posterior = pipe.vae.encode(pixels).latent_dist
    latents = posterior.mean if generator is None else posterior.sample(generator)
    return latents * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: Tensor) -> Tensor:
    """(B, 3, h, w) images in [0, 1]."""
    pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((pixels.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def guided_ddim_sample(
    unet: UNet2DConditionModel,
    scheduler_config: Mapping[str, Any],
    noise_latents: Tensor,
    row_embeds: list[Tensor],
    uncond_embeds: Tensor,
    row_scales: list[float],
    num_inference_steps: int,
    controller: AttentionController | None = None,
    source_trajectory: Inversion | None = None,
    on_step: Callable[[GuidanceStep], None] | None = None,
) -> list[Tensor]:
    """DDIM-sample several prompt rows from the same noise in one UNet call per step.

    Each row has its own embeddings and its own guidance scale (SimInversion's disentangled
    guidance). With `source_trajectory`, row 0 is overwritten with the inverted latent before
    every step, so the source maps a controller copies come from the photo itself (FPE on real
    photos), not from a reconstruction that drifts. Returns the final latents of each row.
    """
    if len(row_embeds) != len(row_scales):
        raise ValueError("one guidance scale per prompt row")
    batch, rows = noise_latents.shape[0], len(row_embeds)
    if controller is not None and controller.num_rows != rows:
        raise ValueError(f"controller expects {controller.num_rows} prompt rows, got {rows}")
    sampler = ddim_sampler(scheduler_config)
    sampler.set_timesteps(num_inference_steps, device=noise_latents.device)
    if source_trajectory is not None and not torch.equal(
        source_trajectory.timesteps.flip(0).cpu(), sampler.timesteps.cpu()
    ):
        raise ValueError("source_trajectory was inverted on other timesteps than this sampler's")

    context = torch.cat(
        [uncond_embeds.expand(batch * rows, -1, -1)] + [embeds.expand(batch, -1, -1) for embeds in row_embeds]
    )
    scales = torch.tensor(row_scales, dtype=noise_latents.dtype, device=noise_latents.device)
    scales = scales.repeat_interleave(batch).view(-1, 1, 1, 1)
    latents = noise_latents.repeat(rows, 1, 1, 1)

    for step_index, t in enumerate(sampler.timesteps):
        if source_trajectory is not None:
            latents = torch.cat([source_trajectory.latents_before_step(step_index), latents[batch:]])
        output = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
        if controller is not None and controller.cur_att_layer != 0:
            raise RuntimeError("the controller did not see every attention layer of the UNet call")
        uncond, cond = output.chunk(2)
        guided = guide(uncond, cond, scales)
        if on_step is not None:
            on_step(GuidanceStep(step_index, t, latents, uncond, cond, guided))
        latents = sampler.step(guided, t, latents).prev_sample
    return list(latents.split(batch))


def _run_device(
    pipe: StableDiffusionPipeline, device: torch.device | str | None, dtype: torch.dtype | None
) -> None:
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)


@torch.no_grad()
def run_text_edit(
    pipe: StableDiffusionPipeline,
    *,
    image: Tensor,
    source_prompt: str,
    target_prompt: str,
    inversion_prompt: str,
    num_inference_steps: int,
    w_inv: float,
    w_src: float,
    w_tgt: float,
    make_controller: Callable[[int], AttentionController] | None,
    drive_source: bool,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    inversion_iterations: int = FIXED_POINT_ITERATIONS,
) -> TextEditResult:
    """Invert `image` (B, 3, h, w in [0, 1], the model's resolution) and sample [source, target].

    `inversion_iterations` are the inversion's fixed-point iterations (0 = plain DDIM inversion,
    as in the papers; each one costs one more UNet pass per inversion step).
    `make_controller(latent_tokens)` builds a fresh controller per call, so no state leaks from
    one edit into the next. `device`/`dtype`, when given, move the pipeline there first.
    """
    _run_device(pipe, device, dtype)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    unet = pipe.unet
    latents = encode_images(pipe, image, generator).to(unet.dtype)
    uncond, source, target, inversion_embeds = encode_prompts(
        pipe, ["", source_prompt, target_prompt, inversion_prompt]
    ).split(1)
    inversion = ddim_invert(
        unet,
        pipe.scheduler.config,
        latents,
        inversion_embeds,
        uncond,
        num_inference_steps,
        w_inv,
        fixed_point_iterations=inversion_iterations,
    )
    controller = make_controller(latents.shape[2] * latents.shape[3]) if make_controller else None
    control = attention_control(unet, controller) if controller is not None else nullcontext()
    with control:
        source_latents, target_latents = guided_ddim_sample(
            unet,
            pipe.scheduler.config,
            inversion.noise_latents,
            [source, target],
            uncond,
            [w_src, w_tgt],
            num_inference_steps,
            controller=controller,
            source_trajectory=inversion if drive_source else None,
        )
    return TextEditResult(
        images=decode_latents(pipe, target_latents),
        reconstructions=decode_latents(pipe, source_latents),
        inversion=inversion,
        params={
            "source_prompt": source_prompt,
            "target_prompt": target_prompt,
            "inversion_prompt": inversion_prompt,
            "num_inference_steps": num_inference_steps,
            "w_inv": w_inv,
            "w_src": w_src,
            "w_tgt": w_tgt,
            "drive_source": drive_source,
            "inversion_fixed_point_iterations": inversion_iterations,
            "controller": type(controller).__name__ if controller else None,
        },
    )


@torch.no_grad()
def regenerate(
    model: LoadedModel | StableDiffusionPipeline,
    *,
    image: Tensor,
    source_prompt: str,
    target_prompt: str,
    num_inference_steps: int | None = None,
    w_inv: float | None = None,
    w_tgt: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    inversion_iterations: int = FIXED_POINT_ITERATIONS,
) -> TextEditResult:
    """The no-control baseline: invert with the source prompt, then sample the target prompt
    alone from the inverted noise. Whatever structure survives here survives without attention
    control, so it is what FPE's self-attention copy must beat. There is no source row, so
    `reconstructions` is the VAE round trip of the photo. Settings left None come from
    `resolve_text_edit("regenerate", ...)` (the model folder's defaults, else 1 / 7.5, 50 steps)."""
    pipe, spec = pipeline_and_spec(model)
    settings = resolve_text_edit(
        "regenerate", spec, num_inference_steps=num_inference_steps, w_inv=w_inv, w_tgt=w_tgt
    )
    num_inference_steps, w_inv, w_tgt = (
        settings.values[k] for k in ("num_inference_steps", "w_inv", "w_tgt")
    )
    _run_device(pipe, device, dtype)
    unet = pipe.unet
    latents = encode_images(pipe, image, generator).to(unet.dtype)
    uncond, source, target = encode_prompts(pipe, ["", source_prompt, target_prompt]).split(1)
    inversion = ddim_invert(
        unet,
        pipe.scheduler.config,
        latents,
        source,
        uncond,
        num_inference_steps,
        w_inv,
        fixed_point_iterations=inversion_iterations,
    )
    (target_latents,) = guided_ddim_sample(
        unet, pipe.scheduler.config, inversion.noise_latents, [target], uncond, [w_tgt], num_inference_steps
    )
    return TextEditResult(
        images=decode_latents(pipe, target_latents),
        reconstructions=decode_latents(pipe, latents),
        inversion=inversion,
        params={
            "source_prompt": source_prompt,
            "target_prompt": target_prompt,
            "num_inference_steps": num_inference_steps,
            "w_inv": w_inv,
            "w_tgt": w_tgt,
            "inversion_fixed_point_iterations": inversion_iterations,
            "defaults_origin": settings.origin,
        },
    )
