"""InstructBrush: learn one instruction per edit category from exemplar pairs, then apply it.

Public entry points: `learn_instruction` (initialise from a phrase bank, then optimise the
instruction's keys/values in every cross-attention layer of the frozen InstructPix2Pix UNet, or its
text embedding for the VISII baseline), `apply_instruction` (batched IP2P dual guidance, output at
the input's resolution), and `save_instruction` / `load_instruction` (safetensors + JSON metadata,
bound to the model's content hash). Method notes: ../shared/research/methods.md §2.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import safetensors.torch
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import Tensor
from tqdm.auto import tqdm

from editing.instruct_init import (
    InitConfig,
    Initialisation,
    ModelLossScorer,
    Scorer,
    choose_initialisation,
    load_phrase_bank,
    model_phrasings,
)
from editing.instruct_kv import InjectionState, InstructionKV, instruction_processors
from editing.instruct_ops import (
    channels_last,
    count_instruction_tokens,
    denoising_loss,
    encode_pairs,
    encode_text,
    pil_to_tensor,
    tensor_to_pil,
    to_native,
)
from editing.lift import lift_edit
from editing.models import DTypeName
from editing.seeds import item_seed

ARTIFACT_FORMAT = "catalogue-retouch/instruction"
ARTIFACT_VERSION = 1


class InstructionModelMismatch(ValueError):
    """The instruction was learned on a different model than the one it is loaded with."""


class InstructionIntegrityError(ValueError):
    """The artifact's bytes or metadata do not match its recorded content hash."""


@dataclass
class InstructionPair:
    """One exemplar: the photo before and after the retoucher's edit, same size."""

    pair_id: str
    before: Image.Image
    after: Image.Image
    sha256: str = ""


class LearnConfig(BaseModel):
    """Learning settings. Steps, lr and batch are ours (the paper gives none); groups, r, eta its."""

    space: Literal["attention", "text"] = Field("attention", description="what is optimised")
    steps: int = Field(400, ge=0, description="optimisation steps (same budget for both spaces)")
    lr: float = Field(2e-2, gt=0, description="Adam learning rate (issue 4 sweep: 1e-2..3e-2 equal)")
    batch_size: int = Field(4, ge=1, description="pairs per step, each at its own random timestep")
    time_groups: int = Field(5, ge=1, description="time-aware K/V sets (attention space; paper: 5)")
    holdout_pairs: int = Field(2, ge=0, description="pairs held aside to choose the best checkpoint")
    eval_every: int = Field(25, ge=1, description="steps between held-out evaluations")
    eval_timesteps: tuple[int, ...] = Field(
        (100, 300, 500, 700, 900), description="fixed timesteps of the held-out evaluation"
    )
    seed: int = Field(0, description="seeds pair/timestep/noise sampling and the evaluation noise")
    init_instruction: str | None = Field(
        None, description="skip the phrase search and start from this instruction"
    )
    init: InitConfig = Field(default_factory=InitConfig)
    guidance_candidates: tuple[float, ...] = Field(
        (1.0, 1.5, 2.0),
        description="text guidance scales tried after learning; the one with the best PSNR on the "
        "exemplar pairs becomes the instruction's default (empty: keep the model's default)",
    )
    progress: bool = Field(True, description="show a progress bar")


class ApplyConfig(BaseModel):
    """Application settings; None takes the instruction's learned defaults (guidance chosen on its
    exemplar pairs), then the model's edits.json defaults (else IP2P's)."""

    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, description="text guidance scale")
    image_guidance_scale: float | None = Field(None, ge=0, description="image guidance scale")
    batch_size: int = Field(16, ge=1, description="images per UNet batch (x2 or x3 rows with guidance)")
    full_resolution: bool = Field(True, description="lift the native-size edit to the input size")
    channels_last: bool = Field(
        True, description="run the UNet and VAE in channels-last memory format (faster, same outputs)"
    )
    dtype: DTypeName = Field(
        "float32",
        description="compute dtype the model must be loaded in (load_model(dtype=...)); bfloat16 is "
        "faster on CPUs with AMX / AVX512-BF16 (measured 1.4-1.6x) and usually on GPUs, its outputs within "
        "about 1/100 of float32's",
    )
    progress: bool = Field(False)


@dataclass
class LearnedInstruction:
    """A learned instruction: its tensors plus everything needed to replay and audit it."""

    category: str
    space: str
    instruction: str
    num_tokens: int
    num_groups: int
    context: Tensor
    tensors: dict[str, Tensor]
    model_id: str
    model_sha256: str
    metadata: dict = field(default_factory=dict)
    sha256: str = ""

    def bank(self, pipe) -> InstructionKV:
        """The K/V bank of this instruction on `pipe`'s UNet, frozen for application."""
        null = encode_text(pipe, [""])[0]
        unet = pipe.unet
        dtype = next(unet.parameters()).dtype
        context = self.context.to(unet.device, dtype)
        bank = InstructionKV(unet, context, null, self.num_tokens, self.space, self.num_groups)
        bank.load_named_tensors({k: v.to(unet.device, dtype) for k, v in self.tensors.items()})
        bank.freeze()
        return bank


def _native_resolution(pipe, spec: dict | None) -> int:
    if spec and spec.get("resolution"):
        return int(spec["resolution"])
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * scale


def _pairs_to_tensors(pairs: Sequence[InstructionPair], resolution: int) -> tuple[Tensor, Tensor]:
    before = torch.stack([to_native(pil_to_tensor(p.before)[None], resolution)[0] for p in pairs])
    after = torch.stack([to_native(pil_to_tensor(p.after)[None], resolution)[0] for p in pairs])
    return before, after


def _initialise(
    model, before: Tensor, after: Tensor, config: LearnConfig, scorer: Scorer | None
) -> tuple[Initialisation, list[dict]]:
    """Phrase search, then keep the templated instruction or the best after-phrase alone, whichever
    the model's own loss prefers (a template the model never saw can be a worse start)."""
    pipe = model.pipe
    phrases = config.init.phrases or load_phrase_bank(extra=model_phrasings(model.spec))
    model_scorer = ModelLossScorer(pipe, config.init)
    scores = (scorer or model_scorer).score(phrases, before, after)
    init = choose_initialisation(phrases, scores, config.init)
    candidates = list(dict.fromkeys([init.instruction, *init.after_phrases[:1]]))
    count = min(before.shape[0], config.init.max_score_pairs)
    cond, target = encode_pairs(pipe, before[:count], after[:count])
    losses = model_scorer.losses(encode_text(pipe, ["", *candidates]), cond, target)
    choice = int(torch.argmin(losses[1:]))
    report = [{"instruction": c, "loss": round(float(losses[i + 1]), 6)} for i, c in enumerate(candidates)]
    report.append({"instruction": "", "loss": round(float(losses[0]), 6)})
    init.instruction = candidates[choice]
    return init, report


def learn_instruction(
    model,
    pairs: Sequence[InstructionPair],
    config: LearnConfig | None = None,
    category: str = "",
    scorer: Scorer | None = None,
) -> LearnedInstruction:
    """Learn the instruction that turns each `before` into its `after`.

    Optimises only the instruction (K/V per cross-attention layer, or token embeddings); the UNet,
    VAE and text encoder stay frozen and unchanged. The best checkpoint is the one with the lowest
    denoising loss on `holdout_pairs` pairs held aside (fixed noise and timesteps); with too few
    pairs, the training pairs are evaluated the same way instead.
    """
    config = config or LearnConfig()
    if not pairs:
        raise ValueError("learn_instruction needs at least one exemplar pair")
    if model.dtype != "float32":
        raise ValueError(
            f"learning needs the model in float32, but it is loaded in {model.dtype}: load it with "
            "load_model(..., dtype=torch.float32) to learn (application may use bfloat16)"
        )
    started = time.perf_counter()
    pipe = model.pipe
    unet = pipe.unet
    device = unet.device
    resolution = _native_resolution(pipe, model.spec)
    before, after = _pairs_to_tensors(pairs, resolution)

    if config.init_instruction is not None:
        init = Initialisation(config.init_instruction, [], [], {})
        candidates: list[dict] = []
    else:
        init, candidates = _initialise(model, before, after, config, scorer)
    num_tokens = max(1, count_instruction_tokens(pipe, init.instruction))
    context = encode_text(pipe, [init.instruction])[0]
    null = encode_text(pipe, [""])[0]
    groups = config.time_groups if config.space == "attention" else 1
    bank = InstructionKV(unet, context, null, num_tokens, config.space, groups)

    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed)).tolist()
    holdout = config.holdout_pairs if len(pairs) - config.holdout_pairs >= 1 else 0
    val_index, train_index = order[:holdout], order[holdout:]
    cond, target = encode_pairs(pipe, before, after)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    num_train = scheduler.config.num_train_timesteps
    state = InjectionState(num_groups=groups, num_train_timesteps=num_train)

    eval_index = val_index or train_index
    eval_t = torch.tensor(config.eval_timesteps, device=device).repeat_interleave(len(eval_index))
    eval_rows = torch.tensor(eval_index).repeat(len(config.eval_timesteps))
    eval_noise = torch.randn(
        (len(eval_rows), *target.shape[1:]), generator=torch.Generator().manual_seed(config.seed + 1)
    ).to(target)
    generator = torch.Generator().manual_seed(config.seed)
    train_rows = torch.tensor(train_index)

    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)
    optimiser = torch.optim.Adam(bank.parameters(), lr=config.lr)
    null_rows = null.unsqueeze(0)

    def evaluate() -> float:
        with torch.no_grad():
            loss = denoising_loss(
                unet,
                scheduler,
                cond[eval_rows],
                target[eval_rows],
                eval_t,
                eval_noise,
                null_rows.expand(len(eval_rows), -1, -1),
            )
        return float(loss.mean())

    log: list[dict] = []
    best_loss = float("inf")
    best_step = 0
    best_tensors: dict[str, Tensor] = {}
    running: list[float] = []
    try:
        with instruction_processors(unet, bank, state):
            best_loss, best_tensors = evaluate(), bank.named_tensors()
            log.append({"step": 0, "train_loss": None, "eval_loss": round(best_loss, 6)})
            bar = tqdm(
                range(1, config.steps + 1),
                desc=f"learn {category or 'instruction'}",
                disable=not config.progress,
            )
            for step in bar:
                picks = train_rows[torch.randint(len(train_rows), (config.batch_size,), generator=generator)]
                timesteps = torch.randint(num_train, (config.batch_size,), generator=generator).to(device)
                noise = torch.randn((config.batch_size, *target.shape[1:]), generator=generator).to(target)
                loss = denoising_loss(
                    unet,
                    scheduler,
                    cond[picks],
                    target[picks],
                    timesteps,
                    noise,
                    null_rows.expand(config.batch_size, -1, -1),
                ).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                running.append(loss.item())
                if step % config.eval_every == 0 or step == config.steps:
                    eval_loss = evaluate()
                    log.append(
                        {
                            "step": step,
                            "train_loss": round(sum(running) / len(running), 6),
                            "eval_loss": round(eval_loss, 6),
                        }
                    )
                    running = []
                    bar.set_postfix(eval_loss=f"{eval_loss:.4f}")
                    if eval_loss < best_loss:
                        best_loss, best_step, best_tensors = eval_loss, step, bank.named_tensors()
    finally:
        for name, param in unet.named_parameters():
            param.requires_grad_(requires_grad[name])

    apply_defaults = _choose_guidance(model, bank, best_tensors, before, after, config, category)

    metadata = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "category": category,
        "space": config.space,
        "instruction": init.instruction,
        "num_tokens": num_tokens,
        "num_groups": groups,
        "num_train_timesteps": num_train,
        "resolution": resolution,
        "model_id": model.model_id,
        "model_sha256": model.sha256,
        "pairs": [{"pair_id": p.pair_id, "sha256": p.sha256} for p in pairs],
        "holdout_pair_ids": [pairs[i].pair_id for i in val_index],
        "init": {
            "before_phrases": init.before_phrases,
            "after_phrases": init.after_phrases,
            "scores": init.scores,
            "candidates": candidates,
        },
        "config": json.loads(config.model_dump_json()),
        "steps": config.steps,
        "final_loss": log[-1]["eval_loss"],
        "best_loss": round(best_loss, 6),
        "best_step": best_step,
        "loss_log": log,
        "apply_defaults": apply_defaults,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return LearnedInstruction(
        category=category,
        space=config.space,
        instruction=init.instruction,
        num_tokens=num_tokens,
        num_groups=groups,
        context=context.detach().cpu(),
        tensors={k: v.cpu() for k, v in best_tensors.items()},
        model_id=model.model_id,
        model_sha256=model.sha256,
        metadata=metadata,
    )


def _psnr(a: Tensor, b: Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-10)))


def _choose_guidance(
    model,
    bank: InstructionKV,
    tensors: dict[str, Tensor],
    before: Tensor,
    after: Tensor,
    config: LearnConfig,
    category: str,
) -> dict:
    """Text guidance scale for this instruction: the candidate whose edits of the exemplar befores
    come closest (PSNR) to their afters, at the model's default steps and image guidance. A learned
    instruction can want more (or less) amplification than the model's default; choosing it on the
    exemplars keeps test images out of the choice."""
    if not config.guidance_candidates:
        return {}
    pipe = model.pipe
    steps, default_text, image_scale = _resolve_apply(ApplyConfig(), model.spec)
    bank.load_named_tensors(tensors)
    bank.freeze()
    seeds = [item_seed("guidance", i, category) for i in range(before.shape[0])]
    scores = {}
    for scale in config.guidance_candidates:
        edited = edit_native(pipe, bank, before, seeds, steps, scale, image_scale)
        scores[scale] = sum(_psnr(e, a) for e, a in zip(edited, after, strict=True)) / len(seeds)
    best = max(scores, key=scores.get)
    return {
        "guidance_scale": float(best),
        "image_guidance_scale": float(image_scale),
        "num_inference_steps": steps,
        "guidance_psnr": {str(k): round(v, 3) for k, v in scores.items()},
        "model_default_guidance_scale": default_text,
    }


def phrase_instruction(model, text: str, category: str = "") -> LearnedInstruction:
    """A plain text instruction in the same form as a learned one (nothing optimised)."""
    pipe = model.pipe
    context = encode_text(pipe, [text])[0]
    num_tokens = max(1, count_instruction_tokens(pipe, text))
    rows = slice(1, 1 + num_tokens)
    return LearnedInstruction(
        category=category,
        space="text",
        instruction=text,
        num_tokens=num_tokens,
        num_groups=1,
        context=context.cpu(),
        tensors={"tokens": context[rows].cpu().clone()},
        model_id=model.model_id,
        model_sha256=model.sha256,
        metadata={"category": category, "space": "text", "instruction": text, "steps": 0},
    )


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


def apply_instruction(
    model,
    instruction: LearnedInstruction,
    images: Sequence[Image.Image],
    config: ApplyConfig | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Image.Image]:
    """Apply a learned instruction to images of any size; one output per input, same size.

    The instruction's K/V are computed once for all images; images are edited `batch_size` at a
    time at the model's native size and lifted back to their own resolution by `lift_edit`.
    Pass seeds from `editing.seeds.item_seed` for replayable, batch-independent outputs.
    """
    config = config or ApplyConfig()
    seeds = list(seeds) if seeds is not None else [0] * len(images)
    if len(seeds) != len(images):
        raise ValueError(f"got {len(images)} images but {len(seeds)} seeds")
    if instruction.model_sha256 != model.sha256:
        raise InstructionModelMismatch(
            _mismatch_message(instruction.metadata, instruction.model_id, instruction.model_sha256, model)
        )
    if model.dtype != config.dtype:
        raise ValueError(
            f"ApplyConfig.dtype is {config.dtype} but the model is loaded in {model.dtype}: load it with "
            f"load_model(..., dtype={config.dtype!r}) or set dtype={model.dtype!r}"
        )
    pipe = model.pipe
    steps, text_scale, image_scale = _resolve_apply(
        config, model.spec, instruction.metadata.get("apply_defaults")
    )
    resolution = _native_resolution(pipe, model.spec)
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


def _canonical(metadata: dict) -> bytes:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()


def _content_hash(data: bytes, metadata: dict) -> str:
    unsigned = {k: v for k, v in metadata.items() if k != "content_sha256"}
    return hashlib.sha256(data + b"\x00" + _canonical(unsigned)).hexdigest()


def save_instruction(instruction: LearnedInstruction) -> tuple[bytes, dict]:
    """(safetensors bytes, JSON-serialisable metadata); the metadata carries a content hash over
    both, so neither can be altered unnoticed. Also sets `instruction.sha256`."""
    tensors = {"context": instruction.context, **instruction.tensors}
    data = safetensors.torch.save({k: v.detach().contiguous().float().cpu() for k, v in tensors.items()})
    metadata = copy.deepcopy(instruction.metadata)
    metadata.update(
        format=ARTIFACT_FORMAT,
        version=ARTIFACT_VERSION,
        category=instruction.category,
        space=instruction.space,
        instruction=instruction.instruction,
        num_tokens=instruction.num_tokens,
        num_groups=instruction.num_groups,
        model_id=instruction.model_id,
        model_sha256=instruction.model_sha256,
    )
    metadata["content_sha256"] = _content_hash(data, metadata)
    instruction.sha256 = metadata["content_sha256"]
    return data, metadata


def _mismatch_message(metadata: dict, model_id: str, model_sha256: str, model) -> str:
    return (
        f"instruction {metadata.get('category') or '(unnamed)'!r} was learned on model {model_id!r} "
        f"(sha256 {model_sha256[:12]}…) but the loaded model is {model.model_id!r} "
        f"(sha256 {model.sha256[:12]}…); learn it again on this model or load the model it was learned on"
    )


def load_instruction(data: bytes, metadata: dict, model) -> LearnedInstruction:
    """Verify the artifact's content hash and its model binding, then rebuild the instruction."""
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise InstructionIntegrityError(
            f"not a {ARTIFACT_FORMAT} artifact (format={metadata.get('format')!r})"
        )
    if metadata.get("content_sha256") != _content_hash(data, metadata):
        raise InstructionIntegrityError(
            "instruction artifact does not match its content hash: the safetensors bytes or the metadata "
            "were modified or belong to different artifacts"
        )
    if metadata["model_sha256"] != model.sha256:
        raise InstructionModelMismatch(
            _mismatch_message(metadata, metadata["model_id"], metadata["model_sha256"], model)
        )
    tensors = safetensors.torch.load(data)
    context = tensors.pop("context")
    return LearnedInstruction(
        category=metadata["category"],
        space=metadata["space"],
        instruction=metadata["instruction"],
        num_tokens=int(metadata["num_tokens"]),
        num_groups=int(metadata["num_groups"]),
        context=context,
        tensors=tensors,
        model_id=metadata["model_id"],
        model_sha256=metadata["model_sha256"],
        metadata=metadata,
        sha256=metadata["content_sha256"],
    )
