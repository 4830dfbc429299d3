"""Learning an instruction with its photometric stage, and choosing its route on held-out pairs.

Most catalogue edits are functions of colour alone, and a 3D LUT fitted from the exemplar pairs
reproduces them almost exactly, at any resolution, in milliseconds; the diffusion model earns its
place only on what colour cannot explain (a vignette, local light, blur). So every instruction gets
the LUT fitted on all its pairs, and one of three routes:

- `lut`: the LUT alone;
- `lut+instructbrush`: the LUT, then an InstructBrush instruction learned on (LUT(before), after), so
  the model learns only the residual;
- `instructbrush`: the learned instruction alone.

`auto` holds `holdout_pairs` pairs back, fits and learns each route on the rest, scores them on the
held-out pairs (PSNR and mean CIEDE2000 against the retoucher's afters, at full resolution), and keeps
a learned route only when it beats the LUT alone by `margin_db`; the chosen route is then learned on
all pairs. The figures go into the instruction's metadata (`route_choice`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from editing.instruct.apply import apply_instruction, apply_photometric
from editing.instruct.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, LearnedInstruction
from editing.instruct.config import ApplyConfig, LearnConfig, RouteConfig
from editing.instruct.init import Scorer
from editing.instruct.learn import InstructionPair, learn_instruction
from editing.instruct.ops import pil_to_tensor
from editing.light_field import (
    LightField,
    choose_light_field,
    fit_light_field,
    remove_light_field,
)
from editing.metrics import psnr
from editing.photometric import Lut, apply_lut, fit_lut
from editing.quality import deltae2000, reference_shift
from editing.seeds import item_seed

LEARNED_ROUTES = ("lut+instructbrush", "instructbrush")
FIELD_REFINEMENTS = 3


def score(outputs: Sequence[Image.Image], truths: Sequence[Image.Image]) -> dict[str, float]:
    """PSNR (dB), mean and 95th-percentile CIEDE2000 of outputs against the retoucher's afters, at
    full resolution, averaged over the images."""
    values, means, p95s = [], [], []
    for output, truth in zip(outputs, truths, strict=True):
        values.append(psnr(pil_to_tensor(output.convert("RGB")), pil_to_tensor(truth.convert("RGB"))))
        out = np.asarray(output.convert("RGB"), dtype=np.float64) / 255.0
        ref = np.asarray(truth.convert("RGB"), dtype=np.float64) / 255.0
        difference = deltae2000(out, ref)
        means.append(float(difference.mean()))
        p95s.append(float(np.percentile(difference, 95)))
    return {"psnr": round(float(np.mean(values)), 3), "deltae2000_mean": round(float(np.mean(means)), 3),
            "deltae2000_p95": round(float(np.mean(p95s)), 3)}


@dataclasses.dataclass
class PhotometricStage:
    """The colour LUT, the light field under it (None when the pairs show none) and the field's figures."""

    lut: Lut
    light_field: LightField | None
    report: dict

    def __call__(self, image: Image.Image) -> Image.Image:
        return apply_photometric(self.lut, self.light_field, image)


def fit_photometric(pairs: Sequence[InstructionPair], route_config: RouteConfig) -> PhotometricStage:
    """The photometric stage of `pairs`: a LUT, and a light field when leaving each pair out shows one
    helps. With a field the two are refined in turn (the LUT refitted on the afters with the field
    taken out, the field on the new LUT's output), since a LUT fitted through a vignette learns the
    vignette's average darkening as a colour change."""
    befores = [p.before.convert("RGB") for p in pairs]
    afters = [p.after.convert("RGB") for p in pairs]
    lut = fit_lut(list(zip(befores, afters, strict=True)), size=route_config.lut_size)
    if not route_config.light_field:
        return PhotometricStage(lut, None, {"used": False, "reason": "light_field disabled"})
    light_field, report = choose_light_field(
        [(apply_lut(lut, b), a) for b, a in zip(befores, afters, strict=True)],
        grid=route_config.light_field_grid, margin_db=route_config.margin_db,
    )
    if light_field is not None:
        for _ in range(FIELD_REFINEMENTS):
            unlit = [remove_light_field(light_field, a) for a in afters]
            lut = fit_lut(list(zip(befores, unlit, strict=True)), size=route_config.lut_size)
            light_field = fit_light_field([(apply_lut(lut, b), a) for b, a in zip(befores, afters, strict=True)],
                                          grid=route_config.light_field_grid)
    return PhotometricStage(lut, light_field, report)


def lut_instruction(
    model, lut: Lut, pairs: Sequence[InstructionPair], category: str, light_field: LightField | None = None
) -> LearnedInstruction:
    """An instruction that is its photometric stage alone: nothing learned, nothing run on the model."""
    metadata = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "category": category,
        "pairs": [{"pair_id": p.pair_id, "sha256": p.sha256} for p in pairs],
        "steps": 0,
    }
    return LearnedInstruction(
        category=category, space="none", instruction="", num_tokens=0, num_groups=0, context=None,
        tensors={}, model_id=model.model_id, model_sha256=model.sha256, metadata=metadata, route="lut",
        lut=lut, light_field=light_field,
    )


def _learn_route(
    model, pairs: Sequence[InstructionPair], stage: PhotometricStage, route: str, config: LearnConfig,
    category: str, scorer: Scorer | None,
) -> LearnedInstruction:
    if route == "lut":
        return lut_instruction(model, stage.lut, pairs, category, stage.light_field)
    if route == "lut+instructbrush":
        pairs = [InstructionPair(p.pair_id, stage(p.before), p.after, p.sha256) for p in pairs]
    learned = learn_instruction(model, pairs, config, category=category, scorer=scorer)
    learned.route, learned.lut = route, stage.lut
    learned.light_field = stage.light_field if route == "lut+instructbrush" else None
    return learned


def choose_route(
    model, pairs: Sequence[InstructionPair], config: LearnConfig, route_config: RouteConfig, category: str,
    scorer: Scorer | None = None,
) -> dict:
    """Score every route on held-out pairs; returns `{"route", "scores", "held_out", ...}`."""
    held = route_config.holdout_pairs
    if len(pairs) - held < 2:
        return {"route": "lut", "scores": {}, "held_out": [],
                "reason": f"{len(pairs)} pairs: too few to hold {held} back and learn on the rest; the LUT alone"}
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(route_config.seed)).tolist()
    held_out = [pairs[i] for i in order[:held]]
    train = [pairs[i] for i in order[held:]]
    stage = fit_photometric(train, route_config)
    truths = [p.after for p in held_out]
    befores = [p.before.convert("RGB") for p in held_out]
    scores = {"identity": score(befores, truths), "lut": score([stage(b) for b in befores], truths)}
    apply_config = ApplyConfig(dtype=model.dtype)
    starts = {}
    for route in LEARNED_ROUTES:
        learned = _learn_route(model, train, stage, route, config, category, scorer)
        starts[route] = learned.instruction  # the phrase it started from
        seeds = [item_seed("route", p.pair_id, category) for p in held_out]
        scores[route] = score(apply_instruction(model, learned, befores, apply_config, seeds), truths)
    best = max(LEARNED_ROUTES, key=lambda r: scores[r]["psnr"])
    gain = scores[best]["psnr"] - scores["lut"]["psnr"]
    chosen = best if gain >= route_config.margin_db else "lut"
    return {
        "route": chosen, "scores": scores, "held_out": [p.pair_id for p in held_out],
        "init_instruction": starts.get(chosen),
        "reason": f"best learned route {best} {gain:+.2f} dB over the LUT alone (margin {route_config.margin_db} dB)",
    }


def learn_routed(
    model,
    pairs: Sequence[InstructionPair],
    config: LearnConfig | None = None,
    route_config: RouteConfig | None = None,
    category: str = "",
    scorer: Scorer | None = None,
) -> LearnedInstruction:
    """Fit the category's LUT, choose its route (or take the one given) and learn that route on all
    pairs. The instruction always carries the LUT fitted on all pairs; `metadata["route_choice"]`
    holds the held-out figures per route when the route was chosen automatically."""
    # 1. check inputs
    config = config or LearnConfig()
    route_config = route_config or RouteConfig()
    if not pairs:
        raise ValueError("learn_routed needs at least one exemplar pair")
    started = time.perf_counter()
    # 2. the route: given, or chosen on held-out pairs
    choice = {"route": route_config.route, "scores": {}, "held_out": [], "reason": "given"}
    if route_config.route == "auto":
        choice = choose_route(model, pairs, config, route_config, category, scorer)
    # 3. the photometric stage on all pairs, then the chosen route on all pairs
    stage = fit_photometric(pairs, route_config)
    if choice.get("init_instruction") and config.init_instruction is None:
        # The phrase search already ran for this route on the training pairs: start from its choice
        # rather than search the phrase bank a third time.
        config = config.model_copy(update={"init_instruction": choice["init_instruction"]})
    instruction = _learn_route(model, pairs, stage, choice["route"], config, category, scorer)
    # 4. what QC compares with: the exemplars' colour shift, and what the photometric stage leaves on
    #    them (the colour difference a learned stage is expected to add)
    residual = score([stage(p.before) for p in pairs], [p.after for p in pairs])
    instruction.metadata.update(
        reference_shift=reference_shift([(p.before, p.after) for p in pairs]),
        route_choice={**choice, "requested": route_config.route},
        route_config=route_config.model_dump(mode="json"),
        lut_fit=residual,
        light_field=stage.report,
        route_wall_time_s=round(time.perf_counter() - started, 3),
    )
    return instruction
