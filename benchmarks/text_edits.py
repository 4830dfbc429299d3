"""Tuning-free text edits on held-out photos with the shipped t2i model: DDIM+P2P (baseline),
SimInversion, FPE and plain regeneration from the inverted noise.

For every style caption of the model's edits.json ("a photo" -> "a sepia photo", ...) the
ground truth is the edit's transform applied to the photo, so the figures are:
- `psnr_vs_truth`: PSNR of the edit against the ground-truth transform (did it do the edit and
  keep everything else);
- `ssim_luma`: full SSIM (scikit-image) of the edit's luminance against the source's luminance;
- `ssim_structure`: the QC structure term (editing.quality.ssim_structure) against the source;
- `psnr_source_row`: PSNR of the decoded source row against the photo (how well the method's
  source branch retraced the photo, which is what SimInversion claims to improve);
- `s_per_edit`, and its ratio to DDIM+P2P measured in the same run.

Those are at the model's native size. What `retouch edit` writes is the edit carried back to the
photo's own resolution (`editing.carry.carry_edit`), so with `--full-side N` (default 256) each
view is also taken at N px, the model edits its area-downsampled copy, and the edit is carried back
two ways, `lift` (local colour affine) and `colour` (a LUT fitted on the native pair), and
`model` names the one the model folder chooses for the caption (`editing.carry.resolve_carry`,
what `retouch edit` uses by default); each is scored against the true transform of the N px view
(`psnr_<carry>`) and by SSIM structure against the N px source (`structure_<carry>`).

The model's per-caption carry choices (edits.json) are calibrated with the same script on
training photos: `--split train --max-photos 4` (never on the held-out photos it reports on).

`--scale METHOD=S` runs a method at another target guidance than the folder's default, with the
calibration script's reading of "scale" (`guidance_kwargs`), and `--methods` runs a subset: together
they measure a candidate default on training photos with every figure of this benchmark.

Usage: python benchmarks/text_edits.py [--steps 50] [--views 1] [--full-side 256] [--model DIR]
[--edits sepia,warm] [--split heldout|train] [--max-photos N] [--methods ddim_p2p,fpe]
[--scale fpe=2 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from editing.carry import carry_edit, resolve_carry
from editing.fpe import fpe_edit
from editing.instruct.ops import to_native
from editing.metrics import psnr
from editing.models import load_model, native_resolution
from editing.p2p import ddim_p2p_edit
from editing.photos import sample_photos
from editing.quality import ssim_structure
from editing.siminversion import siminversion_edit
from editing.text_edit import TextEditResult, regenerate
from editing.transforms import resolve_transform

METHODS: dict[str, Callable[..., TextEditResult]] = {
    "ddim_p2p": ddim_p2p_edit,
    "siminversion": siminversion_edit,
    "fpe": fpe_edit,
    "regenerate": regenerate,
}
SCALED = ("ddim_p2p", "siminversion", "fpe")


def guidance_kwargs(method: str, scale: float, shared: float = 0.5) -> dict[str, float]:
    """One guidance knob per method, the rest at the papers' reading (all passed explicitly):
    DDIM+P2P one scale for both rows with w_inv = 1; SimInversion w_inv = w_src = `shared` (the
    paper's 0.5) and w_tgt = s; FPE one scale for both rows, as its official code runs it."""
    if method == "siminversion":
        return {"w_inv": shared, "w_src": shared, "w_tgt": scale}
    if method == "ddim_p2p":
        return {"w_inv": 1.0, "w_src": scale, "w_tgt": scale}
    if method == "fpe":
        return {"w_src": scale, "w_tgt": scale}
    raise ValueError(f"{method}: no guidance scale to set; choose from {SCALED}")


def parse_scales(values: list[str], methods: list[str]) -> dict[str, float]:
    """`["fpe=2", ...]` -> {"fpe": 2.0}; names the bad item."""
    scales = {}
    for value in values:
        method, sep, scale = value.partition("=")
        if not sep or method not in SCALED:
            raise SystemExit(f"--scale {value!r}: expected METHOD=S with METHOD one of {SCALED}")
        if method not in methods:
            raise SystemExit(f"--scale {value!r}: {method} is not among --methods {methods}")
        try:
            scales[method] = float(scale)
        except ValueError:
            raise SystemExit(f"--scale {value!r}: {scale!r} is not a number") from None
    return scales


LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def square_views(photo: np.ndarray, resolution: int, views: int) -> torch.Tensor:
    """The centre square, then its quadrants, downsampled to `resolution`."""
    image = torch.from_numpy(photo).permute(2, 0, 1).float().div(255)[None]
    height, width = image.shape[-2:]
    side = min(height, width)
    square = image[..., (height - side) // 2 :, (width - side) // 2 :][..., :side, :side]
    half = side // 2
    crops = [square] + [square[..., y : y + half, x : x + half] for y in (0, half) for x in (0, half)]
    return torch.cat(
        [F.interpolate(c, size=(resolution,) * 2, mode="bilinear", antialias=True) for c in crops[:views]]
    ).clamp(0, 1)


def ssim_luma(a: torch.Tensor, b: torch.Tensor) -> float:
    luma_a, luma_b = (x.float().mul(LUMA).sum(1).numpy() for x in (a, b))
    return float(np.mean([structural_similarity(x, y, data_range=1.0) for x, y in zip(luma_a, luma_b)]))


def structure(a: torch.Tensor, b: torch.Tensor) -> float:
    def hwc(x: torch.Tensor) -> np.ndarray:
        return x.permute(1, 2, 0).double().numpy()

    return float(np.mean([ssim_structure(hwc(x), hwc(y)) for x, y in zip(a, b)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="t2i model folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--views", type=int, default=1, help="square views per held-out photo (1-5)")
    parser.add_argument(
        "--full-side", type=int, default=256, help="side of the full-size views the edit is carried to (0: skip)"
    )
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--max-photos", type=int, default=None, help="first N photos of the split")
    parser.add_argument("--edits", default=None, help="comma-separated edit ids (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument(
        "--scale", action="append", default=[], metavar="METHOD=S", help="target guidance for a method (repeatable)"
    )
    parser.add_argument(
        "--inversion-iterations",
        type=int,
        default=None,
        help="fixed-point iterations of the DDIM inversion for every method (0 = plain DDIM inversion, "
        "as in the papers); default: each method's own (SimInversion 1, the others 2)",
    )
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    scales = parse_scales(args.scale, methods)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, kind="t2i")
    spec = loaded.spec or {}
    resolution = native_resolution(loaded.pipe, spec)
    base = spec.get("base_caption", "a photo")
    edits = [e for e in spec.get("edits", []) if args.edits is None or e.get("id") in args.edits.split(",")]
    side = args.full_side or resolution
    chosen = list(sample_photos(args.split).values())[: args.max_photos]
    full = torch.cat([square_views(p, side, args.views) for p in chosen])
    photos = to_native(full, resolution)
    print(
        f"model {loaded.model_id} ({loaded.sha256[:12]}), {len(photos)} {args.split} images at {resolution} px, "
        f"{args.steps} steps, {len(edits)} captions, inversion iterations: "
        f"{'each method default' if args.inversion_iterations is None else args.inversion_iterations}"
        f"; guidance: {scales or 'the folder defaults'}",
        flush=True,
    )

    rows = []
    for edit in edits:
        transform = resolve_transform(edit["transform"])
        truth = transform(photos).clamp(0, 1)
        truth_full = transform(full).clamp(0, 1)
        for name in methods:
            method = METHODS[name]
            started = time.perf_counter()
            result = method(
                loaded.pipe,
                image=photos,
                source_prompt=base,
                target_prompt=edit["caption"],
                num_inference_steps=args.steps,
                **({} if args.inversion_iterations is None else {"inversion_iterations": args.inversion_iterations}),
                **(guidance_kwargs(name, scales[name]) if name in scales else {}),
            )
            seconds = (time.perf_counter() - started) / len(photos)
            row = {
                "edit": edit.get("id", edit["caption"]),
                "method": name,
                "inversion_iterations": result.params["inversion_fixed_point_iterations"],
                "psnr_vs_truth": psnr(result.images, truth),
                "psnr_identity_vs_truth": psnr(photos, truth),
                "ssim_luma": ssim_luma(result.images, photos),
                "ssim_structure": structure(result.images, photos),
                "psnr_source_row": psnr(result.reconstructions, photos),
                "s_per_edit": seconds,
            }
            if args.full_side:
                row["psnr_identity_full"] = psnr(full, truth_full)
                for mode in ("lift", "colour"):
                    carried = [carry_edit(f, s, e, mode) for f, s, e in zip(full, photos, result.images)]
                    images = torch.stack([c.image for c in carried])
                    row[f"psnr_{mode}"] = psnr(images, truth_full)
                    row[f"structure_{mode}"] = structure(images, full)
                row["model_carry"] = resolve_carry(spec, edit["caption"])[0]
                row["psnr_model"] = row[f"psnr_{row['model_carry']}"]
                row["structure_model"] = row[f"structure_{row['model_carry']}"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\nmean over captions")
    header = f"{'method (iter.)':<18}{'psnr_vs_truth':>14}{'ssim_luma':>11}{'ssim_struct':>12}{'psnr_src_row':>13}"
    print(header + f"{'s/edit':>9}{f'time/{methods[0]}':>15}")
    baseline_time = np.mean([r["s_per_edit"] for r in rows if r["method"] == methods[0]])
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        mean = {k: float(np.mean([r[k] for r in mine])) for k in mine[0] if k not in ("edit", "method", "model_carry")}
        label = f"{name} ({mine[0]['inversion_iterations']})"
        print(
            f"{label:<18}{mean['psnr_vs_truth']:>14.2f}{mean['ssim_luma']:>11.3f}{mean['ssim_structure']:>12.3f}"
            f"{mean['psnr_source_row']:>13.2f}{mean['s_per_edit']:>9.2f}{mean['s_per_edit'] / baseline_time:>15.2f}"
        )
    print(f"identity (no edit) psnr_vs_truth {np.mean([r['psnr_identity_vs_truth'] for r in rows]):.2f}")
    if not args.full_side:
        return
    print(f"\ncarried to {side} px, mean over captions (PSNR vs truth / SSIM structure vs the source)")
    modes = ("lift", "colour", "model")
    print(f"{'method':<14}" + "".join(f"{mode:>17}" for mode in modes))
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        cells = "".join(
            f"{np.mean([r[f'psnr_{m}'] for r in mine]):>10.2f} / {np.mean([r[f'structure_{m}'] for r in mine]):.3f}"
            for m in modes
        )
        print(f"{name:<14}{cells}")
    print(f"identity (no edit) at {side} px: {np.mean([r['psnr_identity_full'] for r in rows]):.2f}")
    print("\nper caption: PSNR vs truth at full size, lift / colour, per method; the model's carry; identity")
    for edit in edits:
        mine = {r["method"]: r for r in rows if r["edit"] == edit.get("id", edit["caption"])}
        cells = "  ".join(f"{m} {r['psnr_lift']:.2f}/{r['psnr_colour']:.2f}" for m, r in mine.items())
        first = next(iter(mine.values()))
        print(f"{edit.get('id', edit['caption']):<18}{cells}  {first['model_carry']:<7}{first['psnr_identity_full']:.2f}")


if __name__ == "__main__":
    main()
