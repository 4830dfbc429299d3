"""Calibrate the target guidance of the text edits for a t2i model folder, on TRAINING photos only.

For each method (DDIM+P2P, SimInversion, FPE) and each candidate target guidance, every chosen
caption of the model's edits.json is applied ("a photo" -> caption) to square views of training
photos, and the edit is scored by PSNR against the caption's true transform and by SSIM structure
against the source, exactly as benchmarks/text_edits.py scores them (its methods, views, guidance
reading and metrics are reused). The held-out photos are refused: they are what the benchmark
reports on.

What varies is each method's own guidance knob, the rest stays at the papers' reading:
- ddim_p2p: one scale for both rows, as the method defines it (w_src = w_tgt = s), w_inv = 1;
- siminversion: w_inv = w_src = 0.5 (the paper's), w_tgt = s;
- fpe: one scale for both rows, as the official code runs it (w_src = w_tgt = s).
Plain regeneration (the benchmark's no-control baseline) is not calibrated: it inverts and samples
like DDIM+P2P, so a model folder gives it DDIM+P2P's target scale.

It prints two tables (mean PSNR and mean structure over captions and photos, per method and scale;
doing nothing) and the chosen scale per method as an edits.json `defaults.text_edit` block. The
choice is the highest PSNR, except that scales within `--tie-db` (0.05 dB) of the best count as tied,
and among tied scales the one that keeps more of the photo's structure wins: differences that small
are below what 3 photos and 4 captions can resolve, while the structure difference is what a
retoucher sees (and FPE's whole promise). Run with few photos, captions
and steps: every cell costs one batched edit per caption.

Usage: python scripts/calibrate_text_guidance.py [--photos astronaut,china] [--edits cool,sepia]
       [--scales 1,1.5,2,3,4] [--steps 20] [--threads 2] [--model DIR] [--methods fpe]
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

from benchmarks.text_edits import METHODS, SCALED, guidance_kwargs, square_views, structure
from editing.metrics import psnr
from editing.models import load_model, native_resolution
from editing.photos import HELDOUT, load_photo, photo_names
from editing.transforms import resolve_transform


def choose_scale(psnrs: dict[float, float], structures: dict[float, float], tie_db: float) -> float:
    """The scale with the highest PSNR; scales within `tie_db` of it are tied, and the tied scale with
    the highest structure wins."""
    top = max(psnrs.values())
    tied = [scale for scale, value in psnrs.items() if value >= top - tie_db]
    return max(tied, key=lambda scale: structures[scale])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="t2i model folder (default: the shipped one)")
    parser.add_argument("--photos", default="astronaut,china,present", help="comma-separated training photos")
    parser.add_argument("--edits", default="cool,sepia,darken", help="comma-separated edit ids")
    parser.add_argument("--scales", default="1,1.5,2,3,4", help="comma-separated target guidance values")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--views", type=int, default=1, help="square views per photo (1-5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tie-db", type=float, default=0.05, help="PSNR gap below which scales count as tied")
    parser.add_argument("--methods", default=",".join(SCALED), help=f"comma-separated subset of {SCALED}")
    args = parser.parse_args()
    calibrated = args.methods.split(",")
    if not set(calibrated) <= set(SCALED):
        raise SystemExit(f"--methods: unknown {sorted(set(calibrated) - set(SCALED))}; choose from {SCALED}")
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
    scores: dict[str, dict[float, float]] = {m: {} for m in calibrated}
    structures: dict[str, dict[float, float]] = {m: {} for m in calibrated}
    started = time.perf_counter()
    for method in calibrated:
        for scale in scales:
            per_caption, per_caption_structure = [], []
            for edit in edits:
                result = METHODS[method](
                    loaded.pipe,
                    image=photos,
                    source_prompt=base,
                    target_prompt=edit["caption"],
                    num_inference_steps=args.steps,
                    **guidance_kwargs(method, scale),
                )
                per_caption.append(psnr(result.images, truths[edit["id"]]))
                per_caption_structure.append(structure(result.images, photos))
            scores[method][scale] = float(np.mean(per_caption))
            structures[method][scale] = float(np.mean(per_caption_structure))
            print(
                json.dumps(
                    {
                        "method": method,
                        "w_tgt": scale,
                        "psnr_vs_truth": round(scores[method][scale], 2),
                        "structure_vs_source": round(structures[method][scale], 4),
                        "per_caption": dict(zip(wanted, (round(v, 2) for v in per_caption), strict=True)),
                        "elapsed_s": round(time.perf_counter() - started),
                    }
                ),
                flush=True,
            )

    print(f"\nmean PSNR (dB) against the true edit; doing nothing: {identity:.2f}")
    print(f"{'method':<14}" + "".join(f"{f'w_tgt={s:g}':>10}" for s in scales) + f"{'chosen':>8}{'vs none':>9}")
    best = {method: choose_scale(scores[method], structures[method], args.tie_db) for method in calibrated}
    for method in calibrated:
        print(
            f"{method:<14}"
            + "".join(f"{scores[method][s]:>10.2f}" for s in scales)
            + f"{best[method]:>8g}{scores[method][best[method]] - identity:>+9.2f}"
        )
    print("\nmean SSIM structure against the source (1 = the photo's structure kept)")
    print(f"{'method':<14}" + "".join(f"{f'w_tgt={s:g}':>10}" for s in scales))
    for method in calibrated:
        print(f"{method:<14}" + "".join(f"{structures[method][s]:>10.4f}" for s in scales))
    block = {method: {k: v for k, v in guidance_kwargs(method, best[method]).items()} for method in calibrated}
    if "ddim_p2p" in best:
        block["regenerate"] = {"w_inv": 1.0, "w_tgt": best["ddim_p2p"]}
    print(f"\nedits.json defaults.text_edit (best PSNR per method, ties within {args.tie_db} dB to structure):")
    print(json.dumps(block))


if __name__ == "__main__":
    main()
