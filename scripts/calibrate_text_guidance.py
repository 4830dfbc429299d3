"""Calibrate the target guidance of the text edits for a t2i model folder, on TRAINING photos only.

For each method (DDIM+P2P, SimInversion, FPE) and each candidate target guidance, every chosen
caption of the model's edits.json is applied ("a photo" -> caption) to square views of training
photos, and the edit is scored by PSNR against the caption's true transform and by SSIM structure
against the source, exactly as benchmarks/text_edits.py scores them (its methods, views, guidance
reading and metrics are reused). The held-out photos are refused: they are what the benchmark
reports on.

What varies is each method's own guidance knob, the rest stays at the papers' reading:
- ddim_p2p: one scale for both rows, as the method defines it (w_src = w_tgt = s), w_inv = 1;
- siminversion: w_inv = w_src = 0.5 (the paper's), w_tgt = s; `--siminversion-shared 0.5,1,2` tries
  other shared scales of the inversion and the source row, one table row each;
- fpe: one scale for both rows, as the official code runs it (w_src = w_tgt = s).
`--iterations N` gives every method N fixed-point inversion iterations (default: each method's own,
2 for DDIM+P2P and FPE, 1 for SimInversion), to see what the inversion's compute buys.
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
       [--siminversion-shared 0.5,1] [--iterations 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.text_edits import METHODS, SCALED, guidance_kwargs, square_views, structure
from editing.metrics import psnr
from editing.models import load_model, native_resolution
from editing.photos import HELDOUT, load_photo, photo_names
from editing.transforms import resolve_transform


def choose_scale(psnrs: dict[Any, float], structures: dict[Any, float], tie_db: float) -> Any:
    """The scale (or any cell key) with the highest PSNR; keys within `tie_db` of it are tied, and the
    tied key with the highest structure wins."""
    top = max(psnrs.values())
    tied = [scale for scale, value in psnrs.items() if value >= top - tie_db]
    return max(tied, key=lambda scale: structures[scale])


def calibration_rows(methods: list[str], siminversion_shared: str) -> dict[str, tuple[str, float]]:
    """The table's rows: label -> (method, SimInversion's shared scale of the inversion and the source
    row); SimInversion gets a row per `--siminversion-shared` value; names the bad item."""
    shared = []
    for value in siminversion_shared.split(","):
        try:
            shared.append(float(value))
        except ValueError:
            raise SystemExit(f"--siminversion-shared: {value!r} is not a number") from None
    rows: dict[str, tuple[str, float]] = {}
    for method in methods:
        if method != "siminversion":
            rows[method] = (method, 0.5)
        elif len(shared) == 1:
            rows[method] = (method, shared[0])
        else:
            rows.update({f"siminversion w={w:g}": (method, w) for w in shared})
    return rows


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
    parser.add_argument("--siminversion-shared", default="0.5",
                        help="comma-separated w_inv = w_src values for SimInversion, a row each")
    parser.add_argument("--iterations", type=int, default=None,
                        help="fixed-point inversion iterations for every method (default: each method's own)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if not set(methods) <= set(SCALED):
        raise SystemExit(f"--methods: unknown {sorted(set(methods) - set(SCALED))}; choose from {SCALED}")
    if args.iterations is not None and args.iterations < 0:
        raise SystemExit(f"--iterations: {args.iterations} is below 0")
    rows = calibration_rows(methods, args.siminversion_shared)
    iterations = {} if args.iterations is None else {"inversion_iterations": args.iterations}
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
    scores: dict[str, dict[float, float]] = {label: {} for label in rows}
    structures: dict[str, dict[float, float]] = {label: {} for label in rows}
    started = time.perf_counter()
    for label, (method, shared) in rows.items():
        for scale in scales:
            per_caption, per_caption_structure = [], []
            for edit in edits:
                result = METHODS[method](
                    loaded.pipe,
                    image=photos,
                    source_prompt=base,
                    target_prompt=edit["caption"],
                    num_inference_steps=args.steps,
                    **guidance_kwargs(method, scale, shared),
                    **iterations,
                )
                per_caption.append(psnr(result.images, truths[edit["id"]]))
                per_caption_structure.append(structure(result.images, photos))
            scores[label][scale] = float(np.mean(per_caption))
            structures[label][scale] = float(np.mean(per_caption_structure))
            print(
                json.dumps(
                    {
                        "method": label,
                        "w_tgt": scale,
                        **iterations,
                        "psnr_vs_truth": round(scores[label][scale], 2),
                        "structure_vs_source": round(structures[label][scale], 4),
                        "per_caption": dict(zip(wanted, (round(v, 2) for v in per_caption), strict=True)),
                        "elapsed_s": round(time.perf_counter() - started),
                    }
                ),
                flush=True,
            )

    print(f"\nmean PSNR (dB) against the true edit; doing nothing: {identity:.2f}")
    width = max(14, *(len(label) + 2 for label in rows))
    print(f"{'method':<{width}}" + "".join(f"{f'w_tgt={s:g}':>10}" for s in scales) + f"{'chosen':>8}{'vs none':>9}")
    best = {label: choose_scale(scores[label], structures[label], args.tie_db) for label in rows}
    for label in rows:
        print(
            f"{label:<{width}}"
            + "".join(f"{scores[label][s]:>10.2f}" for s in scales)
            + f"{best[label]:>8g}{scores[label][best[label]] - identity:>+9.2f}"
        )
    print("\nmean SSIM structure against the source (1 = the photo's structure kept)")
    print(f"{'method':<{width}}" + "".join(f"{f'w_tgt={s:g}':>10}" for s in scales))
    for label in rows:
        print(f"{label:<{width}}" + "".join(f"{structures[label][s]:>10.4f}" for s in scales))
    # Per method, the same rule over every (row, scale) cell: SimInversion's shared scale is chosen too.
    block = {}
    for method in methods:
        cells = {(label, s): scores[label][s] for label, (m, _) in rows.items() if m == method for s in scales}
        kept = {(label, s): structures[label][s] for label, s in cells}
        label, scale = choose_scale(cells, kept, args.tie_db)
        block[method] = guidance_kwargs(method, scale, rows[label][1])
    if "ddim_p2p" in best:
        block["regenerate"] = {"w_inv": 1.0, "w_tgt": best["ddim_p2p"]}
    print(f"\nedits.json defaults.text_edit (best PSNR per method, ties within {args.tie_db} dB to structure):")
    print(json.dumps(block))
    if iterations:
        print(f"(measured with --iterations {args.iterations}; edits.json cannot declare it, each method "
              "keeps its own count)")


if __name__ == "__main__":
    main()
