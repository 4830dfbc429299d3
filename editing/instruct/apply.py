"""Applying an instruction: its photometric stage at each photo's own resolution, then batched IP2P
dual guidance at the model's native size lifted back to each input's resolution; the choice of an
instruction's default text guidance; and what the colour QC expects of an instruction's output.

The photometric stage needs numpy and Pillow only. torch, diffusers' attention processors and the lift
are imported by the functions that run the learned stage, so a partition run whose instructions are
all LUTs starts without them (about 2 s less per process; benchmarks/README.md, Scale).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from editing.instruct.artifact import LearnedInstruction, check_model_binding
from editing.instruct.config import ApplyConfig
from editing.light_field import apply_light_field
from editing.models import native_resolution
from editing.photometric import apply_lut
from editing.quality import QCThresholds
from editing.seeds import item_seed

if TYPE_CHECKING:
    from torch import Tensor

    from editing.instruct.kv import InstructionKV


def _resolve_apply(
    config: ApplyConfig, spec: dict | None, learned: dict | None = None
) -> tuple[int, float, float]:
    defaults = {
        **(spec or {}).get("defaults", {}),
        **{
            k: v
            for k, v in (learned or {}).items()
            if k in {"num_inference_steps", "guidance_scale", "image_guidance_scale"}
        },
    }
    steps = config.num_inference_steps or int(defaults.get("num_inference_steps", 20))
    text = (
        config.guidance_scale
        if config.guidance_scale is not None
        else float(defaults.get("guidance_scale", 7.5))
    )
    image = (
        config.image_guidance_scale
        if config.image_guidance_scale is not None
        else float(defaults.get("image_guidance_scale", 1.5))
    )
    return steps, text, image


def edit_native(
    pipe,
    bank: InstructionKV,
    sources: Tensor,
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    image_guidance_scale: float,
    use_channels_last: bool = True,
) -> Tensor:
    """IP2P dual guidance on a batch at native size: (B, 3, h, w) in [0, 1] -> same.

    Rows are [instruction | image-only | unconditional] chunks as in the stock pipeline, and like
    it guidance is skipped (instruction rows only) unless guidance_scale > 1 and
    image_guidance_scale >= 1; at image_guidance_scale == 1 the unconditional rows are skipped,
    because they cancel out of the combination. Each image draws its noise from its own
    generator, so its output does not depend on its batch. `use_channels_last` runs the UNet and
    VAE in channels-last memory format for the call (same outputs within float tolerance, faster
    convolutions).
    """
    import torch

    from editing.instruct.kv import InjectionState, instruction_processors
    from editing.instruct.ops import channels_last

    unet, vae = pipe.unet, pipe.vae
    device, dtype = unet.device, next(unet.parameters()).dtype
    batch = sources.shape[0]
    guided_rows = guidance_scale > 1.0 and image_guidance_scale >= 1.0
    # With image guidance 1 the unconditional row cancels out of the combination exactly:
    # uncond + g (text - image) + 1 (image - uncond) = image + g (text - image).
    needs_uncond = guided_rows and image_guidance_scale != 1.0
    chunks = (3 if needs_uncond else 2) if guided_rows else 1
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
    with torch.no_grad(), channels_last(vae, use_channels_last):
        pixels = (sources * 2 - 1).to(device, dtype).contiguous(memory_format=memory_format)
        image_latents = vae.encode(pixels).latent_dist.mode()
        shape = (1, unet.config.out_channels, *image_latents.shape[-2:])
        latents = torch.cat([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])
        latents = latents * scheduler.init_noise_sigma
        conditioning = image_latents
        if needs_uncond:
            conditioning = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        elif guided_rows:
            conditioning = torch.cat([image_latents, image_latents])
        step_kwargs = {}
        step_params = inspect.signature(scheduler.step).parameters
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0
        if "generator" in step_params:
            step_kwargs["generator"] = generators
        state = InjectionState(
            num_groups=bank.num_groups, num_train_timesteps=scheduler.config.num_train_timesteps
        )
        state.instruction_rows = torch.arange(chunks * batch, device=device) < batch
        placeholder = bank.context.unsqueeze(0).expand(chunks * batch, -1, -1)
        with instruction_processors(unet, bank, state), channels_last(unet, use_channels_last):
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * chunks), t)
                model_input = torch.cat([model_input, conditioning], dim=1).contiguous(
                    memory_format=memory_format
                )
                output = unet(model_input, t, placeholder).sample
                if needs_uncond:
                    text, image, uncond = output.chunk(3)
                    output = (
                        uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)
                    )
                elif guided_rows:
                    text, image = output.chunk(2)
                    output = image + guidance_scale * (text - image)
                latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
        latents = (latents / vae.config.scaling_factor).contiguous(memory_format=memory_format)
        decoded = vae.decode(latents).sample
    return (decoded.float() / 2 + 0.5).clamp(0, 1).cpu()


def choose_guidance(
    model,
    bank: InstructionKV,
    before: Tensor,
    after: Tensor,
    candidates: Sequence[float],
    category: str,
) -> dict:
    """Text guidance scale for an instruction: the candidate whose edits of the exemplar befores
    come closest (PSNR) to their afters, at the model's default steps and image guidance. A learned
    instruction can want more (or less) amplification than the model's default; choosing it on the
    exemplars keeps test images out of the choice. `bank` must hold the instruction, frozen."""
    from editing.metrics import psnr

    if not candidates:
        return {}
    steps, default_text, image_scale = _resolve_apply(ApplyConfig(), model.spec)
    seeds = [item_seed("guidance", i, category) for i in range(before.shape[0])]
    scores = {
        scale: psnr(edit_native(model.pipe, bank, before, seeds, steps, scale, image_scale), after)
        for scale in candidates
    }
    best = max(scores, key=scores.get)
    return {
        "guidance_scale": float(best),
        "image_guidance_scale": float(image_scale),
        "num_inference_steps": steps,
        "guidance_psnr": {str(k): round(v, 3) for k, v in scores.items()},
        "model_default_guidance_scale": default_text,
    }


def apply_photometric(lut, light_field, image: Image.Image) -> Image.Image:
    """A photometric stage on one photo at its own resolution: the LUT, then the light field if any."""
    out = apply_lut(lut, image.convert("RGB"))
    return apply_light_field(light_field, out) if light_field is not None else out


def photometric_output(instruction: LearnedInstruction, image: Image.Image) -> Image.Image:
    """The instruction's photometric stage on one photo (`apply_photometric`)."""
    return apply_photometric(instruction.lut, instruction.light_field, image)


def expected_output(
    instruction: LearnedInstruction, source: Image.Image, output: Image.Image | None = None
) -> Image.Image | None:
    """What the instruction's photometric edit makes of `source` (its LUT, then its light field),
    for the colour QC. On a route without a learned stage the instruction's `output` is that very
    edit, so a given `output` is returned as it is instead of applying the stage a second time
    (that second application was ~15% of a LUT partition's time)."""
    if instruction.lut is None:
        return None
    if output is not None and not instruction.learned_stage:
        return output
    return photometric_output(instruction, source)


def qc_thresholds(instruction: LearnedInstruction, base: QCThresholds) -> QCThresholds:
    """`base` with the colour limits widened by what the LUT leaves on the exemplars, for routes
    with a learned stage: a vignette learned on top of the LUT moves every output away from
    LUT(source) by about as much as the retoucher's afters differ from LUT(before), and that is
    the edit, not a cast. The LUT alone reproduces LUT(source) and gets no allowance."""
    fit = instruction.metadata.get("lut_fit") or {}
    if not instruction.learned_stage or not fit:
        return base
    mean, p95 = float(fit.get("deltae2000_mean", 0.0)), float(fit.get("deltae2000_p95", 0.0))
    return dataclasses.replace(
        base,
        flag_deltae2000_mean=base.flag_deltae2000_mean + mean, fail_deltae2000_mean=base.fail_deltae2000_mean + mean,
        flag_deltae2000_p95=base.flag_deltae2000_p95 + p95, fail_deltae2000_p95=base.fail_deltae2000_p95 + p95,
    )


def apply_instruction(
    model,
    instruction: LearnedInstruction,
    images: Sequence[Image.Image],
    config: ApplyConfig | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Image.Image]:
    """Apply a learned instruction to images of any size; one output per input, same size.

    The instruction's route decides the stages. Its photometric stage (routes `lut`,
    `lut+instructbrush`: the LUT, then its light field if it has one) applies at each photo's own
    resolution, exactly; the learned stage (routes `lut+instructbrush`,
    `instructbrush`) edits the result `batch_size` images at a time at the model's native size, with
    the instruction's K/V computed once, and `lift_edit` carries that edit back to each photo's
    resolution. A LUT-only instruction never touches the model (`model` may be None).
    Pass seeds from `editing.seeds.item_seed` for replayable, batch-independent outputs.
    """
    config = config or ApplyConfig()
    seeds = list(seeds) if seeds is not None else [0] * len(images)
    if len(seeds) != len(images):
        raise ValueError(f"got {len(images)} images but {len(seeds)} seeds")
    if not instruction.applicable:
        raise ValueError(f"instruction {instruction.category!r} was loaded photometric_only: load it with the model")
    if instruction.photometric_stage:
        images = [photometric_output(instruction, image) for image in images]
    if not instruction.learned_stage:
        return list(images)
    return _apply_learned_stage(model, instruction, images, config, seeds)


def _apply_learned_stage(
    model, instruction: LearnedInstruction, images: Sequence[Image.Image], config: ApplyConfig, seeds: list[int]
) -> list[Image.Image]:
    """`apply_instruction`'s learned stage, on the photometric stage's outputs."""
    import torch
    from tqdm.auto import tqdm

    from editing.instruct.ops import pil_to_tensor, tensor_to_pil, to_native
    from editing.lift import lift_edit

    check_model_binding(instruction.metadata, instruction.model_id, instruction.model_sha256, model)
    if model.dtype != config.dtype:
        raise ValueError(
            f"ApplyConfig.dtype is {config.dtype} but the model is loaded in {model.dtype}: load it with "
            f"load_model(..., dtype={config.dtype!r}) or set dtype={model.dtype!r}"
        )
    pipe = model.pipe
    steps, text_scale, image_scale = _resolve_apply(
        config, model.spec, instruction.metadata.get("apply_defaults")
    )
    resolution = native_resolution(pipe, model.spec)
    bank = instruction.bank(pipe)
    outputs: list[Image.Image] = []
    bar = tqdm(
        total=len(images), desc=f"apply {instruction.category or 'instruction'}", disable=not config.progress
    )
    for start in range(0, len(images), config.batch_size):
        chunk = [pil_to_tensor(img) for img in images[start : start + config.batch_size]]
        small = torch.cat([to_native(x[None], resolution) for x in chunk])
        edited = edit_native(
            pipe,
            bank,
            small,
            seeds[start : start + len(chunk)],
            steps,
            text_scale,
            image_scale,
            use_channels_last=config.channels_last,
        )
        for full, source_small, edited_small in zip(chunk, small, edited, strict=True):
            same_size = full.shape[-2:] == edited_small.shape[-2:]
            result = (
                edited_small
                if same_size or not config.full_resolution
                else lift_edit(full, source_small, edited_small)
            )
            outputs.append(tensor_to_pil(result))
        bar.update(len(chunk))
    bar.close()
    return outputs
