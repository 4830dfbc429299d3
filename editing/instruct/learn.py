"""Learning an instruction from exemplar pairs (InstructBrush).

Initialise from a phrase bank, then optimise the instruction's keys/values in every
cross-attention layer of the frozen InstructPix2Pix UNet (or its text embedding, for the VISII
baseline), keep the checkpoint with the lowest held-out denoising loss, and choose the text
guidance it is applied with on the exemplars themselves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from editing.instruct.apply import choose_guidance
from editing.instruct.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, LearnedInstruction
from editing.instruct.config import LearnConfig
from editing.instruct.init import (
    Initialisation,
    ModelLossScorer,
    Scorer,
    choose_initialisation,
    load_phrase_bank,
    model_phrasings,
)
from editing.instruct.kv import InjectionState, InstructionKV, instruction_processors
from editing.instruct.ops import (
    count_instruction_tokens,
    denoising_loss,
    encode_pairs,
    encode_text,
    pil_to_tensor,
    to_native,
)
from editing.models import native_resolution


@dataclass
class InstructionPair:
    """One exemplar: the photo before and after the retoucher's edit, same size."""

    pair_id: str
    before: Image.Image
    after: Image.Image
    sha256: str = ""


@dataclass
class _Setup:
    """What the optimisation starts from: the pairs at native size and as latents, the initial
    instruction and its K/V bank, the train/held-out split and the fixed evaluation batch."""

    resolution: int
    before: Tensor
    after: Tensor
    init: Initialisation
    init_candidates: list[dict]
    num_tokens: int
    context: Tensor
    bank: InstructionKV
    scheduler: object
    state: InjectionState
    cond: Tensor
    target: Tensor
    null_rows: Tensor
    val_index: list[int]
    train_rows: Tensor
    eval_rows: Tensor
    eval_timesteps: Tensor
    eval_noise: Tensor

    def loss(self, unet, rows: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Per-row denoising loss of the pairs `rows` under the bank's current instruction."""
        return denoising_loss(
            unet,
            self.scheduler,
            self.cond[rows],
            self.target[rows],
            timesteps,
            noise,
            self.null_rows.expand(len(rows), -1, -1),
        )

    def eval_loss(self, unet) -> float:
        """Mean loss on the evaluation batch (same pairs, timesteps and noise every time)."""
        with torch.no_grad():
            return float(self.loss(unet, self.eval_rows, self.eval_timesteps, self.eval_noise).mean())


@dataclass
class _Optimised:
    """The best checkpoint and the loss log of the optimisation."""

    best_tensors: dict[str, Tensor]
    best_loss: float
    best_step: int
    log: list[dict]


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


def _setup(
    model, pairs: Sequence[InstructionPair], config: LearnConfig, scorer: Scorer | None
) -> _Setup:
    pipe = model.pipe
    unet = pipe.unet
    device = unet.device
    resolution = native_resolution(pipe, model.spec)
    before, after = _pairs_to_tensors(pairs, resolution)

    # 1. the initial instruction and the K/V bank it fills
    if config.init_instruction is not None:
        init = Initialisation(config.init_instruction, [], [], {})
        init_candidates: list[dict] = []
    else:
        init, init_candidates = _initialise(model, before, after, config, scorer)
    num_tokens = max(1, count_instruction_tokens(pipe, init.instruction))
    context = encode_text(pipe, [init.instruction])[0]
    null = encode_text(pipe, [""])[0]
    groups = config.time_groups if config.space == "attention" else 1
    bank = InstructionKV(unet, context, null, num_tokens, config.space, groups)

    # 2. the split: held-out pairs choose the checkpoint; too few pairs evaluate the training pairs
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed)).tolist()
    holdout = config.holdout_pairs if len(pairs) - config.holdout_pairs >= 1 else 0
    val_index, train_index = order[:holdout], order[holdout:]
    cond, target = encode_pairs(pipe, before, after)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    num_train = scheduler.config.num_train_timesteps

    # 3. the evaluation batch: every evaluated pair at every fixed timestep, with fixed noise
    eval_index = val_index or train_index
    eval_rows = torch.tensor(eval_index).repeat(len(config.eval_timesteps))
    eval_noise = torch.randn(
        (len(eval_rows), *target.shape[1:]), generator=torch.Generator().manual_seed(config.seed + 1)
    ).to(target)
    return _Setup(
        resolution=resolution,
        before=before,
        after=after,
        init=init,
        init_candidates=init_candidates,
        num_tokens=num_tokens,
        context=context,
        bank=bank,
        scheduler=scheduler,
        state=InjectionState(num_groups=groups, num_train_timesteps=num_train),
        cond=cond,
        target=target,
        null_rows=null.unsqueeze(0),
        val_index=val_index,
        train_rows=torch.tensor(train_index),
        eval_rows=eval_rows,
        eval_timesteps=torch.tensor(config.eval_timesteps, device=device).repeat_interleave(len(eval_index)),
        eval_noise=eval_noise,
    )


def _optimise(unet, setup: _Setup, config: LearnConfig, category: str) -> _Optimised:
    """Adam on the bank alone, evaluating every `eval_every` steps; the UNet's own parameters are
    frozen for the loop and their requires_grad flags restored afterwards."""
    device = unet.device
    num_train = setup.state.num_train_timesteps
    generator = torch.Generator().manual_seed(config.seed)
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)
    optimiser = torch.optim.Adam(setup.bank.parameters(), lr=config.lr)
    log: list[dict] = []
    best_step = 0
    running: list[float] = []
    try:
        with instruction_processors(unet, setup.bank, setup.state):
            best_loss, best_tensors = setup.eval_loss(unet), setup.bank.named_tensors()
            log.append({"step": 0, "train_loss": None, "eval_loss": round(best_loss, 6)})
            bar = tqdm(
                range(1, config.steps + 1),
                desc=f"learn {category or 'instruction'}",
                disable=not config.progress,
            )
            for step in bar:
                rows = setup.train_rows
                picks = rows[torch.randint(len(rows), (config.batch_size,), generator=generator)]
                timesteps = torch.randint(num_train, (config.batch_size,), generator=generator).to(device)
                noise = torch.randn((config.batch_size, *setup.target.shape[1:]), generator=generator)
                loss = setup.loss(unet, picks, timesteps, noise.to(setup.target)).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                running.append(loss.item())
                if step % config.eval_every == 0 or step == config.steps:
                    eval_loss = setup.eval_loss(unet)
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
                        best_loss, best_step, best_tensors = eval_loss, step, setup.bank.named_tensors()
    finally:
        for name, param in unet.named_parameters():
            param.requires_grad_(requires_grad[name])
    return _Optimised(best_tensors=best_tensors, best_loss=best_loss, best_step=best_step, log=log)


def _record(
    model,
    pairs: Sequence[InstructionPair],
    config: LearnConfig,
    category: str,
    setup: _Setup,
    result: _Optimised,
    apply_defaults: dict,
    wall_time_s: float,
) -> LearnedInstruction:
    """The learned instruction with the metadata that replays and audits it."""
    init = setup.init
    metadata = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "category": category,
        "space": config.space,
        "instruction": init.instruction,
        "num_tokens": setup.num_tokens,
        "num_groups": setup.bank.num_groups,
        "num_train_timesteps": setup.state.num_train_timesteps,
        "resolution": setup.resolution,
        "model_id": model.model_id,
        "model_sha256": model.sha256,
        "pairs": [{"pair_id": p.pair_id, "sha256": p.sha256} for p in pairs],
        "holdout_pair_ids": [pairs[i].pair_id for i in setup.val_index],
        "init": {
            "before_phrases": init.before_phrases,
            "after_phrases": init.after_phrases,
            "scores": init.scores,
            "candidates": setup.init_candidates,
        },
        "config": json.loads(config.model_dump_json()),
        "steps": config.steps,
        "final_loss": result.log[-1]["eval_loss"],
        "best_loss": round(result.best_loss, 6),
        "best_step": result.best_step,
        "loss_log": result.log,
        "apply_defaults": apply_defaults,
        "wall_time_s": round(wall_time_s, 3),
    }
    return LearnedInstruction(
        category=category,
        space=config.space,
        instruction=init.instruction,
        num_tokens=setup.num_tokens,
        num_groups=setup.bank.num_groups,
        context=setup.context.detach().cpu(),
        tensors={k: v.cpu() for k, v in result.best_tensors.items()},
        model_id=model.model_id,
        model_sha256=model.sha256,
        metadata=metadata,
    )


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
    # 1. check inputs
    config = config or LearnConfig()
    if not pairs:
        raise ValueError("learn_instruction needs at least one exemplar pair")
    if model.dtype != "float32":
        raise ValueError(
            f"learning needs the model in float32, but it is loaded in {model.dtype}: load it with "
            "load_model(..., dtype=torch.float32) to learn (application may use bfloat16)"
        )
    started = time.perf_counter()
    # 2. initial instruction, split and evaluation batch
    setup = _setup(model, pairs, config, scorer)
    # 3. optimise, keeping the checkpoint with the lowest held-out loss
    result = _optimise(model.pipe.unet, setup, config, category)
    # 4. the text guidance the best checkpoint edits its own exemplars best with
    setup.bank.load_named_tensors(result.best_tensors)
    setup.bank.freeze()
    apply_defaults = choose_guidance(
        model, setup.bank, setup.before, setup.after, config.guidance_candidates, category
    )
    # 5. the instruction and the metadata that replays it
    return _record(
        model, pairs, config, category, setup, result, apply_defaults, time.perf_counter() - started
    )
