"""The text-edit contact sheet in docs/: every style caption of the shipped t2i model x the held-out
photos x the three methods (DDIM+P2P, SimInversion, FPE), each at the model's own defaults, next to
the photo and the true edit.

One row per (caption, photo): photo | truth | DDIM+P2P | SimInversion | FPE. By default each tile is
what `retouch edit` writes for a photo of `--scale` x the model's size: the model edits the area-
downsampled copy and the edit is carried back the way the model chooses for that caption (colour or
lift, `editing.carry`; named in the row's label). `--native` shows the model's own output instead,
scaled up by nearest neighbour.

Run: python -m benchmarks.text_edit_sheet [--steps 20] [--output docs/text-edits.jpg] [--scale 2] [--native]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmarks.text_edits import METHODS, square_views
from editing.carry import carry_edit, resolve_carry
from editing.instruct.ops import to_native
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
    parser.add_argument("--native", action="store_true", help="the model's native output, not the carried one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(kind="t2i")
    spec = loaded.spec or {}
    resolution = native_resolution(loaded.pipe, spec)
    base = spec.get("base_caption", "a photo")
    size, label_w, pad, header = resolution * args.scale, 150, 4, 16
    shown = torch.cat([square_views(p, resolution if args.native else size, 1) for p in sample_photos("heldout").values()])
    photos = to_native(shown, resolution)
    edits = spec.get("edits", [])
    rows_n = len(edits) * len(photos)
    sheet = Image.new("RGB", (label_w + len(COLUMNS) * (size + pad), header + rows_n * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((label_w + c * (size + pad) + 2, 2), name, fill="black")
    started = time.perf_counter()
    row = 0
    for edit in edits:
        truth = resolve_transform(edit["transform"])(shown).clamp(0, 1)
        carry = resolve_carry(spec, edit["caption"])[0]
        outputs = {
            name: METHODS[name](loaded.pipe, image=photos, source_prompt=base, target_prompt=edit["caption"],
                                num_inference_steps=args.steps).images
            for name in SHOWN
        }
        if not args.native:
            outputs = {
                name: torch.stack([carry_edit(f, s, e, carry).image for f, s, e in zip(shown, photos, images)])
                for name, images in outputs.items()
            }
        for i in range(len(photos)):
            y = header + row * (size + pad)
            draw.text((4, y + size // 2 - 12), f'"{edit["caption"]}"', fill="black")
            if not args.native:
                draw.text((4, y + size // 2 + 2), f"carried: {carry}", fill="gray")
            tiles = [shown[i], truth[i], *(outputs[name][i] for name in SHOWN)]
            for c, tile in enumerate(tiles):
                sheet.paste(_tile(tile, size), (label_w + c * (size + pad), y))
            row += 1
        print(f"{edit['caption']}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output, quality=90, optimize=True)
    print(f"wrote {args.output}: {len(edits)} captions x {len(photos)} held-out photos x {len(SHOWN)} methods, "
          f"{args.steps} steps, {'native' if args.native else f'carried to {size} px'}, "
          f"model {loaded.model_id} ({loaded.sha256[:12]})")


if __name__ == "__main__":
    main()
