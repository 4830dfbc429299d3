"""InstructBrush quality on held-out categories the shipped model was never trained on.

Each category is a composition of trained edits or a transform the model never saw, built from
crops of the held-out photos (editing.photos "heldout"): 10 exemplar pairs to learn from and 5
other crops to test on. For every category we report PSNR to the ground truth for

    identity        the unedited source
    best phrase     the best single text instruction and text guidance scale (chosen together by
                    PSNR on 5 of the training pairs among the model's own phrasings and the
                    phrase-bank initialisation, guidance from LearnConfig.guidance_candidates), no
                    learning
    text            VISII-style text-space learning
    attention       InstructBrush attention-space learning (same steps, pairs and seed)
    attention bf16  the same learned instruction applied by the model loaded in bfloat16 (the fast
                    application dtype)

at the model's native size (learned instructions at their own default guidance, chosen on their
exemplar pairs by `learn_instruction`), plus the attention output at full resolution (lifted) against the
full-resolution ground truth, and the wall time of learning. Targets: attention >=
identity + 3 dB and >= best phrase + 1 dB on average; full-res >= native - 1 dB.

Run: nice -n 10 .venv/bin/python -m benchmarks.instruct_quality [--steps N] [--categories a,b]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from editing.instruct import (
    ApplyConfig,
    InstructionPair,
    LearnConfig,
    apply_instruction,
    edit_native,
    learn_instruction,
    phrase_instruction,
)
from editing.instruct.ops import pil_to_tensor, tensor_to_pil, to_native
from editing.metrics import psnr
from editing.models import load_model, native_resolution
from editing.photos import sample_photos
from editing.seeds import item_seed
from editing.transforms import EDITS, cool, decrease_contrast, increase_contrast, sepia, vignette, warm


def green_tint(x: Tensor) -> Tensor:
    """A colour cast none of the trained edits produces."""
    return (x * x.new_tensor((0.88, 1.1, 0.9)).view(1, 3, 1, 1)).clamp(0, 1)


CATEGORIES: dict[str, Callable[[Tensor], Tensor]] = {
    "warm_contrast": lambda x: increase_contrast(warm(x)),
    "faded_cool": lambda x: decrease_contrast(cool(x)),
    "sepia_vignette": lambda x: vignette(sepia(x)),
    "green_tint": green_tint,
}


def crops(photos: dict[str, np.ndarray], count: int, seed: int) -> list[tuple[str, Tensor]]:
    """Random square-ish crops, 96-256 px, from the held-out photos."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        height, width = photo.shape[:2]
        side = int(rng.integers(96, min(256, height, width) + 1))
        aspect = rng.uniform(0.75, 1.33)
        crop_h, crop_w = side, min(width, int(side * aspect))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        crop = photo[top : top + crop_h, left : left + crop_w]
        out.append((f"{name}-{seed}-{i}", torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255))
    return out


def _native_outputs(model, instruction, sources: Tensor, ids: list[str], config: dict) -> Tensor:
    pipe = model.pipe
    learned = instruction.metadata.get("apply_defaults") or {}
    config = {**config, **{k: v for k, v in learned.items() if k in config}}
    seeds = [item_seed("bench", image_id, instruction.category) for image_id in ids]
    return edit_native(pipe, instruction.bank(pipe), sources, seeds, **config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="learning steps (default: LearnConfig)")
    parser.add_argument("--categories", default="warm_contrast,faded_cool,green_tint")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model()
    fast = load_model(dtype="bfloat16")  # the fast application dtype, scored on the same instructions
    spec_defaults = (model.spec or {}).get("defaults", {})
    resolution = native_resolution(model.pipe, model.spec)
    apply_cfg = {
        "num_inference_steps": int(spec_defaults.get("num_inference_steps", 20)),
        "guidance_scale": float(spec_defaults.get("guidance_scale", 7.5)),
        "image_guidance_scale": float(spec_defaults.get("image_guidance_scale", 1.5)),
    }
    print(f"model {model.model_id} ({model.sha256[:12]}), native {resolution} px, apply {apply_cfg}")
    photos = sample_photos("heldout")
    phrasings = [edit.phrasings[0] for edit in EDITS.values()]
    overrides = {"steps": args.steps} if args.steps is not None else {}

    rows = []
    for index, name in enumerate(args.categories.split(",")):
        transform = CATEGORIES[name]
        train = crops(photos, 10, seed=100 + index)
        test = crops(photos, 5, seed=200 + index)
        pairs = [
            InstructionPair(pid, tensor_to_pil(x), tensor_to_pil(transform(x[None])[0]), "")
            for pid, x in train
        ]
        train_src = torch.cat([to_native(pil_to_tensor(p.before)[None], resolution) for p in pairs])
        train_gt = transform(train_src)
        test_ids = [pid for pid, _ in test]
        test_src = torch.cat([to_native(x[None], resolution) for _, x in test])
        test_gt = transform(test_src)

        started = time.perf_counter()
        attention = learn_instruction(
            model, pairs, LearnConfig(space="attention", **overrides), category=name
        )
        attention_s = time.perf_counter() - started
        started = time.perf_counter()
        text = learn_instruction(
            model,
            pairs,
            LearnConfig(space="text", init_instruction=attention.instruction, **overrides),
            category=name,
        )
        text_s = time.perf_counter() - started

        candidates = list(dict.fromkeys([attention.instruction, *phrasings]))
        train_ids = [p.pair_id for p in pairs][:5]  # half the pairs keep the phrase search affordable
        train_src, train_gt = train_src[:5], train_gt[:5]
        phrase_scores = {}
        for phrase in candidates:
            for scale in LearnConfig().guidance_candidates or (apply_cfg["guidance_scale"],):
                cfg = {**apply_cfg, "guidance_scale": scale}
                out = _native_outputs(
                    model, phrase_instruction(model, phrase, name), train_src, train_ids, cfg
                )
                phrase_scores[phrase, scale] = psnr(out, train_gt)
        best_phrase, best_scale = max(phrase_scores, key=phrase_scores.get)
        phrase_cfg = {**apply_cfg, "guidance_scale": best_scale}

        def test_psnr(
            instruction, src=test_src, ids=test_ids, truth=test_gt, cfg=apply_cfg, on=model
        ) -> float:
            out = _native_outputs(on, instruction, src, ids, cfg)
            return psnr(out, truth)

        row = {
            "category": name,
            "identity": psnr(test_src, test_gt),
            "best_phrase": test_psnr(phrase_instruction(model, best_phrase, name), cfg=phrase_cfg),
            "text": test_psnr(text),
            "attention": test_psnr(attention),
            "attention_bf16": test_psnr(attention, on=fast),
        }
        full_outputs = apply_instruction(
            model,
            attention,
            [tensor_to_pil(x) for _, x in test],
            ApplyConfig(),
            seeds=[item_seed("bench", i, name) for i in test_ids],
        )
        row["attention_fullres"] = float(
            np.mean(
                [
                    psnr(pil_to_tensor(out), transform(x[None])[0])
                    for out, (_, x) in zip(full_outputs, test, strict=True)
                ]
            )
        )
        row.update(
            learn_attention_s=attention_s,
            learn_text_s=text_s,
            init=attention.instruction,
            best_phrase_text=best_phrase,
        )
        attention_g = attention.metadata["apply_defaults"].get("guidance_scale")
        text_g = text.metadata["apply_defaults"].get("guidance_scale")
        rows.append(row)
        print(
            f"{name:15s} identity {row['identity']:5.2f}  best phrase {row['best_phrase']:5.2f} "
            f"({best_phrase!r}, g {best_scale})  text {row['text']:5.2f} (g {text_g})  "
            f"attention {row['attention']:5.2f} (g {attention_g}; bfloat16 {row['attention_bf16']:5.2f})  "
            f"attention full-res {row['attention_fullres']:5.2f}  | learn attention {attention_s:5.1f} s, "
            f"text {text_s:5.1f} s | init {attention.instruction!r}",
            flush=True,
        )

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    print("\nmean PSNR (dB) at native size over", len(rows), "categories x 5 test crops:")
    for key in ("identity", "best_phrase", "text", "attention", "attention_bf16", "attention_fullres"):
        print(f"  {key:18s} {mean(key):6.2f}")
    print(f"attention - identity    = {mean('attention') - mean('identity'):+.2f} dB (target >= +3)")
    print(f"attention - best phrase = {mean('attention') - mean('best_phrase'):+.2f} dB (target >= +1)")
    print(f"attention - text        = {mean('attention') - mean('text'):+.2f} dB")
    print(f"bfloat16 - float32      = {mean('attention_bf16') - mean('attention'):+.2f} dB (application dtype)")
    print(f"full-res - native       = {mean('attention_fullres') - mean('attention'):+.2f} dB (target >= -1)")
    print(
        f"learning one category (10 pairs, default steps): mean {mean('learn_attention_s'):.1f} s, "
        f"max {max(r['learn_attention_s'] for r in rows):.1f} s (target <= 180 s)"
    )


if __name__ == "__main__":
    main()
