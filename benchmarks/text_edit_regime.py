"""Do issue 14's two missed orderings appear at Stable Diffusion's guidance on the shipped t2i?

Issue 14 asks SimInversion >= DDIM+P2P and FPE's SSIM structure >= plain regeneration + 0.05. Both
orderings come from Stable Diffusion at 7.5, where the source row drifts from the photo (what
SimInversion's 0.5 removes) and regeneration loses the layout (what FPE's self-attention copy
keeps). This script runs the four edits at one shared target scale per "regime" (the papers'
reading: DDIM+P2P w_inv 1 and both rows at S; SimInversion 0.5 / 0.5 / S; FPE both rows at S;
regeneration w_inv 1, target S) and at the model folder's own defaults, on TRAINING photos only,
and prints per method: PSNR against the true edit, SSIM structure against the photo, source-row
PSNR and seconds, plus the two margins the issue asks about.

Usage: python -m benchmarks.text_edit_regime [--scales 5,7.5] [--photos astronaut,china,present]
[--edits cool,darken,sepia,saturate] [--steps 10] [--threads 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.text_edits import METHODS, guidance_kwargs, square_views, structure
from editing.metrics import psnr
from editing.models import load_model, native_resolution
from editing.photos import HELDOUT, load_photo
from editing.transforms import resolve_transform


def regime_kwargs(method: str, scale: float | None) -> dict[str, float]:
    """Guidance of one method in a regime; None is the model folder's defaults. The three methods
    take the calibration's reading of a scale; regeneration has no source row, so w_inv 1, target S."""
    if scale is None:
        return {}
    if method == "regenerate":
        return {"w_inv": 1.0, "w_tgt": scale}
    return guidance_kwargs(method, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="t2i model folder (default: the shipped one)")
    parser.add_argument("--scales", default="5,7.5", help="comma-separated shared target scales")
    parser.add_argument("--photos", default="astronaut,china,present", help="comma-separated training photos")
    parser.add_argument("--edits", default="cool,darken,sepia,saturate", help="comma-separated edit ids")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    names = args.photos.split(",")
    if set(names) & set(HELDOUT):
        raise SystemExit(f"{sorted(set(names) & set(HELDOUT))}: held-out photos are for the benchmark only")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, kind="t2i")
    spec = loaded.spec or {}
    resolution = native_resolution(loaded.pipe, spec)
    edits = [e for e in spec.get("edits", []) if e["id"] in args.edits.split(",")]
    if len(edits) != len(args.edits.split(",")):
        raise SystemExit(f"unknown edit ids in {args.edits}; the model has {[e['id'] for e in spec['edits']]}")
    photos = torch.cat([square_views(load_photo(n), resolution, 1) for n in names])
    truths = {e["id"]: resolve_transform(e["transform"])(photos).clamp(0, 1) for e in edits}
    identity = float(np.mean([psnr(photos, t) for t in truths.values()]))
    print(f"model {loaded.model_id}, photos {names}, {len(edits)} captions, {args.steps} steps; "
          f"doing nothing {identity:.2f} dB", flush=True)
    regimes: list[float | None] = [None] + [float(s) for s in args.scales.split(",")]
    table = []
    for scale in regimes:
        row: dict[str, dict[str, float]] = {}
        for method in METHODS:
            started = time.perf_counter()
            scores, structures, sources = [], [], []
            for edit in edits:
                result = METHODS[method](
                    loaded.pipe, image=photos, source_prompt=spec.get("base_caption", "a photo"),
                    target_prompt=edit["caption"], num_inference_steps=args.steps,
                    **regime_kwargs(method, scale),
                )
                scores.append(psnr(result.images, truths[edit["id"]]))
                structures.append(structure(result.images, photos))
                sources.append(psnr(result.reconstructions, photos))
            row[method] = {"psnr": float(np.mean(scores)), "structure": float(np.mean(structures)),
                           "source_row": float(np.mean(sources)), "seconds": time.perf_counter() - started}
            print(json.dumps({"scale": scale or "defaults", "method": method,
                              **{k: round(v, 4) for k, v in row[method].items()}}), flush=True)
        table.append((scale, row))
    print("\n| target scale | method | PSNR vs truth | SSIM structure | source-row PSNR |\n|---|---|---|---|---|")
    for scale, row in table:
        for method, figures in row.items():
            print(f"| {scale or 'defaults'} | {method} | {figures['psnr']:.2f} | {figures['structure']:.4f} "
                  f"| {figures['source_row']:.2f} |")
    print("\n| target scale | SimInversion - DDIM+P2P, dB | FPE - regeneration, structure | "
          "FPE - DDIM+P2P, structure |\n|---|---|---|---|")
    for scale, row in table:
        print(f"| {scale or 'defaults'} | {row['siminversion']['psnr'] - row['ddim_p2p']['psnr']:+.3f} "
              f"| {row['fpe']['structure'] - row['regenerate']['structure']:+.4f} "
              f"| {row['fpe']['structure'] - row['ddim_p2p']['structure']:+.4f} |")


if __name__ == "__main__":
    main()
