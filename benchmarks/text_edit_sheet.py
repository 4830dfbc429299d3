"""The text-edit contact sheet in docs/: every style caption of the shipped t2i model x the held-out
photos x the three methods (DDIM+P2P, SimInversion, FPE), each at the model's own defaults, next to
the photo and the true edit.

One row per (caption, photo): photo | truth | DDIM+P2P | SimInversion | FPE, at the model's native
size scaled up for viewing (nearest neighbour, so what you see is what the model made).

Run: python -m benchmarks.text_edit_sheet [--steps 20] [--output docs/text-edits.jpg] [--scale 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmarks.text_edits import METHODS, square_views
from editing.models import load_model, native_resolution
from editing.photos import sample_photos
from editing.transforms import resolve_transform

SHOWN = ("ddim_p2p", "siminversion", "fpe")
COLUMNS = ("photo", "truth", "DDIM+P2P", "SimInversion", "FPE")


def _tile(x: torch.Tensor, size: int) -> Image.Image:
    array = x.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="docs/text-edits.jpg")
    parser.add_argument("--scale", type=int, default=2, help="display pixels per model pixel")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(kind="t2i")
    spec = loaded.spec or {}
    resolution = native_resolution(loaded.pipe, spec)
    base = spec.get("base_caption", "a photo")
    photos = torch.cat([square_views(p, resolution, 1) for p in sample_photos("heldout").values()])
    size, label_w, pad, header = resolution * args.scale, 150, 4, 16
    edits = spec.get("edits", [])
    rows_n = len(edits) * len(photos)
    sheet = Image.new("RGB", (label_w + len(COLUMNS) * (size + pad), header + rows_n * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((label_w + c * (size + pad) + 2, 2), name, fill="black")
    started = time.perf_counter()
    row = 0
    for edit in edits:
        truth = resolve_transform(edit["transform"])(photos).clamp(0, 1)
        outputs = {
            name: METHODS[name](loaded.pipe, image=photos, source_prompt=base, target_prompt=edit["caption"],
                                num_inference_steps=args.steps).images
            for name in SHOWN
        }
        for i in range(len(photos)):
            y = header + row * (size + pad)
            draw.text((4, y + size // 2 - 6), f'"{edit["caption"]}"', fill="black")
            tiles = [photos[i], truth[i], *(outputs[name][i] for name in SHOWN)]
            for c, tile in enumerate(tiles):
                sheet.paste(_tile(tile, size), (label_w + c * (size + pad), y))
            row += 1
        print(f"{edit['caption']}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output, quality=90, optimize=True)
    print(f"wrote {args.output}: {len(edits)} captions x {len(photos)} held-out photos x {len(SHOWN)} methods, "
          f"{args.steps} steps, model {loaded.model_id} ({loaded.sha256[:12]})")


if __name__ == "__main__":
    main()
