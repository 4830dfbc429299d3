"""Calibrate the target guidance of the text edits for a t2i model folder, on TRAINING photos only.

For each method (DDIM+P2P, SimInversion, FPE) and each candidate target guidance, every chosen
caption of the model's edits.json is applied ("a photo" -> caption) to square views of training
photos, and the edit is scored by PSNR against the caption's true transform, exactly as
benchmarks/text_edits.py scores it (its methods, views and `editing.metrics.psnr` are reused). The
held-out photos are refused: they are what the benchmark reports on.

What varies is each method's own guidance knob, the rest stays at the papers' reading:
- ddim_p2p: one scale for both rows, as the method defines it (w_src = w_tgt = s), w_inv = 1;
- siminversion: w_inv = w_src = 0.5 (the paper's), w_tgt = s;
- fpe: one scale for both rows, as the official code runs it (w_src = w_tgt = s).
Plain regeneration (the benchmark's no-control baseline) is not calibrated: it inverts and samples
like DDIM+P2P, so a model folder gives it DDIM+P2P's target scale.

It prints a table (mean PSNR over captions and photos per method and scale, and doing nothing) and
the best scale per method as an edits.json `defaults.text_edit` block. Run with few photos, captions
and steps: every cell costs one batched edit per caption.

Usage: python scripts/calibrate_text_guidance.py [--photos astronaut,china] [--edits cool,sepia]
       [--scales 1,1.5,2,3,4] [--steps 20] [--threads 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.text_edits import METHODS, square_views
from editing.metrics import psnr
from editing.models import load_model, native_resolution
from editing.photos import HELDOUT, load_photo, photo_names
from editing.transforms import resolve_transform

CALIBRATED = ("ddim_p2p", "siminversion", "fpe")


def method_kwargs(method: str, scale: float) -> dict[str, float]:
    """Every scale passed explicitly, so the figures do not depend on the folder's current defaults."""
    if method == "siminversion":
        return {"w_inv": 0.5, "w_src": 0.5, "w_tgt": scale}
    if method == "ddim_p2p":
        return {"w_inv": 1.0, "w_src": scale, "w_tgt": scale}
    if method == "fpe":
        return {"w_src": scale, "w_tgt": scale}
    raise ValueError(method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="t2i model folder (default: the shipped one)")
    parser.add_argument("--photos", default="astronaut,china,present", help="comma-separated training photos")
    parser.add_argument("--edits", default="cool,sepia,darken", help="comma-separated edit ids")
    parser.add_argument("--scales", default="1,1.5,2,3,4", help="comma-separated target guidance values")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--views", type=int, default=1, help="square views per photo (1-5)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = args.photos.split(",")
    held_out = sorted(set(names) & set(HELDOUT))
    if held_out:
        raise SystemExit(
            f"{', '.join(held_out)}: held-out photos are for the benchmark, never for calibration"
        )
    unknown = sorted(set(names) - set(photo_names("train")))
    if unknown:
        raise SystemExit(f"unknown training photos {unknown}; choose from {photo_names('train')}")
    scales = [float(s) for s in args.scales.split(",")]

    loaded = load_model(args.model, kind="t2i")
    spec = loaded.spec or {}
    resolution = native_resolution(loaded.pipe, spec)
    base = spec.get("base_caption", "a photo")
    wanted = args.edits.split(",")
    edits = [e for e in spec.get("edits", []) if e["id"] in wanted]
    if len(edits) != len(wanted):
        raise SystemExit(
            f"unknown edit ids in {wanted}; the model has {[e['id'] for e in spec.get('edits', [])]}"
        )
    photos = torch.cat([square_views(load_photo(n), resolution, args.views) for n in names])
    print(
        f"model {loaded.model_id} ({loaded.sha256[:12]}), training photos {names} "
        f"({len(photos)} views at {resolution} px), captions {wanted}, {args.steps} steps, "
        f"{args.threads} threads",
        flush=True,
    )

    truths = {e["id"]: resolve_transform(e["transform"])(photos).clamp(0, 1) for e in edits}
    identity = float(np.mean([psnr(photos, truth) for truth in truths.values()]))
    scores: dict[str, dict[float, float]] = {m: {} for m in CALIBRATED}
    started = time.perf_counter()
    for method in CALIBRATED:
        for scale in scales:
            per_caption = []
            for edit in edits:
                result = METHODS[method](
                    loaded.pipe,
                    image=photos,
                    source_prompt=base,
                    target_prompt=edit["caption"],
                    num_inference_steps=args.steps,
                    **method_kwargs(method, scale),
                )
                per_caption.append(psnr(result.images, truths[edit["id"]]))
            scores[method][scale] = float(np.mean(per_caption))
            print(
                json.dumps(
                    {
                        "method": method,
                        "w_tgt": scale,
                        "psnr_vs_truth": round(scores[method][scale], 2),
                        "per_caption": dict(zip(wanted, (round(v, 2) for v in per_caption), strict=True)),
                        "elapsed_s": round(time.perf_counter() - started),
                    }
                ),
                flush=True,
            )

    print(f"\nmean PSNR (dB) against the true edit; doing nothing: {identity:.2f}")
    print(f"{'method':<14}" + "".join(f"{f'w_tgt={s:g}':>10}" for s in scales) + f"{'best':>8}{'vs none':>9}")
    best = {}
    for method in CALIBRATED:
        best[method] = max(scores[method], key=scores[method].get)
        print(
            f"{method:<14}"
            + "".join(f"{scores[method][s]:>10.2f}" for s in scales)
            + f"{best[method]:>8g}{scores[method][best[method]] - identity:>+9.2f}"
        )
    block = {method: {k: v for k, v in method_kwargs(method, best[method]).items()} for method in CALIBRATED}
    block["regenerate"] = {"w_inv": 1.0, "w_tgt": best["ddim_p2p"]}
    print("\nedits.json defaults.text_edit (best per method):")
    print(json.dumps(block))


if __name__ == "__main__":
    main()
