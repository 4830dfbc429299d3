"""Transformation-oriented instruction initialisation (InstructBrush §4.2), scorer pluggable.

The paper ranks the phrases of a vocabulary by how much more they describe the before set than the
after set (and vice versa) in CLIP space, keeps the top r = 5 above a threshold eta = 0.15 on each
side and writes "turn <p_x> into <p_y>". No CLIP weights exist offline, so the default scorer asks
the editing model itself: a phrase describes the *after* side if conditioning on it lowers the
IP2P denoising loss of before -> after, and the *before* side if it lowers the loss of
after -> before.

Normalisation (the paper's is unknown): a phrase's score is the relative reduction of the
denoising loss against the empty instruction, (L_empty - L_phrase) / L_empty, averaged over the
pairs at fixed timesteps with fixed noise. 0 means the phrase explains nothing, 1 that it explains
all of the loss; eta = 0.15 therefore asks a phrase to remove at least 15% of the loss. When no
phrase passes, we start from the top-1 phrase, not the paper's empty "None" instruction (see
`choose_initialisation`). A CLIP
scorer should map its similarity differences to the same kind of range (e.g. divide by the largest
difference) before the threshold applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from editing.instruct.config import InitConfig
from editing.instruct.ops import denoising_loss, encode_pairs, encode_text

PHRASE_BANK = Path(__file__).parent.parent / "data" / "phrases.txt"


def load_phrase_bank(path: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The shipped phrase bank plus `extra` phrases (the model's own vocabulary), deduplicated."""
    lines = (path or PHRASE_BANK).read_text(encoding="utf-8").splitlines()
    phrases = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys([*phrases, *extra]))


def model_phrasings(spec: dict | None) -> list[str]:
    """Instruction phrasings listed in a model's edits.json, if it lists any."""
    if not spec:
        return []
    phrasings = []
    for edit in spec.get("edits", []):
        if isinstance(edit, dict):
            phrasings.extend(str(p) for p in edit.get("phrasings", []))
    return phrasings


@dataclass
class PhraseScores:
    """Normalised scores per phrase: how well it describes the before and the after images."""

    before: Tensor
    after: Tensor


class Scorer(Protocol):
    """Ranks phrases for a set of exemplar pairs; (N, 3, h, w) tensors in [0, 1]."""

    def score(self, phrases: Sequence[str], before: Tensor, after: Tensor) -> PhraseScores: ...


class ModelLossScorer:
    """Default scorer: relative reduction of the editing model's own denoising loss."""

    def __init__(self, pipe, config: InitConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or InitConfig()
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)

    def losses(self, contexts: Tensor, cond: Tensor, target: Tensor) -> Tensor:
        """Mean denoising loss per context (P,) at the fixed timesteps and noise."""
        config = self.config
        pairs = cond.shape[0]
        timesteps = torch.tensor(config.score_timesteps, device=cond.device).repeat_interleave(pairs)
        steps = len(config.score_timesteps)
        generator = torch.Generator().manual_seed(config.seed)
        noise = torch.randn((steps * pairs, *target.shape[1:]), generator=generator).to(target)
        cond_rows, target_rows = cond.repeat(steps, 1, 1, 1), target.repeat(steps, 1, 1, 1)
        rows = steps * pairs
        per_chunk = max(1, config.rows_per_batch // rows)
        unet = self.pipe.unet
        results = []
        with torch.no_grad():
            for start in range(0, contexts.shape[0], per_chunk):
                chunk = contexts[start : start + per_chunk]
                count = chunk.shape[0]
                loss = denoising_loss(
                    unet,
                    self.scheduler,
                    cond_rows.repeat(count, 1, 1, 1),
                    target_rows.repeat(count, 1, 1, 1),
                    timesteps.repeat(count),
                    noise.repeat(count, 1, 1, 1),
                    chunk.repeat_interleave(rows, dim=0),
                )
                results.append(loss.view(count, rows).mean(1))
        return torch.cat(results)

    def score(self, phrases: Sequence[str], before: Tensor, after: Tensor) -> PhraseScores:
        count = min(before.shape[0], self.config.max_score_pairs)
        before, after = before[:count], after[:count]
        contexts = encode_text(self.pipe, ["", *phrases])
        cond_b, target_a = encode_pairs(self.pipe, before, after)
        cond_a, target_b = encode_pairs(self.pipe, after, before)
        forward = self.losses(contexts, cond_b, target_a)
        backward = self.losses(contexts, cond_a, target_b)
        return PhraseScores(
            before=(backward[0] - backward[1:]) / backward[0],
            after=(forward[0] - forward[1:]) / forward[0],
        )


@dataclass
class Initialisation:
    """The chosen initial instruction and why."""

    instruction: str
    before_phrases: list[str]
    after_phrases: list[str]
    scores: dict[str, dict[str, float]]


def _top(phrases: Sequence[str], scores: Tensor, config: InitConfig) -> list[str]:
    order = torch.argsort(scores, descending=True)[: config.top_r]
    return [phrases[i] for i in order.tolist() if float(scores[i]) >= config.threshold]


def choose_initialisation(phrases: Sequence[str], scores: PhraseScores, config: InitConfig) -> Initialisation:
    """Top-r phrases above the threshold on each side, composed with the template (or a fallback)."""
    before = _top(phrases, scores.before, config)
    after = _top(phrases, scores.after, config)
    if not after:
        # Deviation from the paper (which falls back to the empty "None" instruction): our scores
        # are relative loss reductions of a small x0-prediction model, where even the right edit's
        # phrase rarely removes 15% of the loss, so the threshold often rejects everything. The
        # top-1 phrase still lowers the loss most, so learning starts from the best phrase rather
        # than from a neutral one it then has to unlearn.
        top = int(torch.argmax(scores.after))
        instruction = config.fallback if config.fallback is not None else phrases[top]
        if config.fallback is None:
            after = [phrases[top]]
    elif not before:
        instruction = config.after_only_template.format(after=", ".join(after))
    else:
        instruction = config.template.format(before=", ".join(before), after=", ".join(after))
    kept = set(before) | set(after)
    return Initialisation(
        instruction=instruction,
        before_phrases=before,
        after_phrases=after,
        scores={
            p: {"before": round(float(scores.before[i]), 5), "after": round(float(scores.after[i]), 5)}
            for i, p in enumerate(phrases)
            if p in kept
        },
    )
