"""`python -m flows.demo` (what `make demo` runs): the nightly refresh end to end on this machine.

It builds a small shop from the sample photos that ship in installed wheels: exemplar pairs for three
retouching styles (made with the ground-truth edit functions, so the intended edit is known), a
catalogue of crops and flips in several partitions, one broken exemplar pair and one corrupt catalogue
image (to show how bad inputs are reported), then runs `catalogue_refresh` on the shipped model with
the embedded Prefect server and the auto review policy, into ./demo-output/.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from editing import transforms
from editing.photos import photo_names, sample_photos
from storage.images import encode_png
from storage.layout import write_catalogue_index
from storage.run_layout import (
    PUBLISHED_PREFIX,
    contact_sheets_prefix,
    edited_prefix,
    manifest_prefix,
    summary_key,
)
from storage.store import Store, open_store

# name -> the functions of editing/transforms.py composed, in order: what a retoucher's "house
# style" might be. crisp-product was contrast 1.6x then 2x saturation until session 6: it turned
# faces and a cat red, and a retoucher would not have signed it (QC's skin check now flags that).
STYLES: dict[str, tuple[str, ...]] = {
    "warm-studio": ("warm", "brighten"),
    "soft-matte": ("decrease_contrast", "desaturate"),
    "crisp-product": ("crisp",),
}
PAIRS_PER_STYLE = 6
PARTITIONS = 4
ITEMS_PER_PARTITION = 16
SIDE = 160
CORRUPT_ID = "corrupt-upload"


def styled(image: Image.Image, style: str) -> Image.Image:
    """Apply a style's ground-truth edits to a photo."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    for edit in STYLES[style]:
        x = getattr(transforms, edit)(x)
    return Image.fromarray((x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def crops(photos: dict[str, np.ndarray], count: int, seed: int) -> list[Image.Image]:
    """`count` square crops (random position and scale, some mirrored) resized to SIDE px."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = []
    for i in range(count):
        photo = photos[names[i % len(names)]]
        height, width = photo.shape[:2]
        size = int(min(height, width) * rng.uniform(0.5, 0.95))
        top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        image = Image.fromarray(photo[top : top + size, left : left + size]).resize((SIDE, SIDE), Image.LANCZOS)
        out.append(image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image)
    return out


def build_demo_store(store: Store) -> dict:
    """Write exemplars, catalogue images and the index; returns what was built."""
    train = sample_photos("train")
    for s, style in enumerate(STYLES):
        for p, before in enumerate(crops(train, PAIRS_PER_STYLE, seed=100 + s)):
            store.put_bytes(f"exemplars/{style}/pair-{p:02d}/before.png", encode_png(before))
            store.put_bytes(f"exemplars/{style}/pair-{p:02d}/after.png", encode_png(styled(before, style)))
    # A pair whose "after" never finished uploading: reported, left out, the other pairs are used.
    store.put_bytes("exemplars/soft-matte/pair-broken/before.png", encode_png(crops(train, 1, seed=7)[0]))
    rows = []
    catalogue = crops(sample_photos("all"), PARTITIONS * ITEMS_PER_PARTITION, seed=1)
    for i, image in enumerate(catalogue):
        image_id = f"sku-{i:04d}"
        key = f"catalogue/images/{image_id}.jpg"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        store.put_bytes(key, buf.getvalue(), content_type="image/jpeg")
        rows.append({"image_id": image_id, "key": key, "category": list(STYLES)[i % len(STYLES)],
                     "partition": f"p{i // ITEMS_PER_PARTITION:03d}"})
    # A JPEG cut off mid-upload: its manifest row records the error, the rest of the run completes.
    store.put_bytes(f"catalogue/images/{CORRUPT_ID}.jpg", buf.getvalue()[: len(buf.getvalue()) // 3])
    rows.append({"image_id": CORRUPT_ID, "key": f"catalogue/images/{CORRUPT_ID}.jpg",
                 "category": "warm-studio", "partition": "p000"})
    write_catalogue_index(store, pd.DataFrame(rows))
    return {"pairs": PAIRS_PER_STYLE * len(STYLES), "catalogue": len(rows), "partitions": PARTITIONS,
            "photos": len(photo_names("all"))}


def results_table(summary: dict) -> str:
    """A short plain-text table of the run: items, QC outcome and review per category."""
    lines = [f"{'category':<15}{'items':>6}{'pass':>6}{'flag':>6}{'fail':>6}{'error':>6}  instruction"]
    for category, info in sorted(summary["categories"].items()):
        qc = info["qc_status"]
        lines.append(f"{category:<15}{info['items']:>6}" + "".join(f"{qc.get(s, 0):>6}" for s in
                     ("pass", "flag", "fail", "error")) + f"  {info['instruction']}")
    return "\n".join(lines)


def where(store: Store, key: str) -> str:
    """A path people can open (local demo store) or the URI."""
    path = store.local_path(key)
    return str(path) if path is not None else store.uri_for(key)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for the demo store (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="instruction learning steps (default: LearnParams's)")
    parser.add_argument("--model", default=None, help="model folder or s3:// prefix (default: the shipped model)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server migrates a fresh database on first start; on a busy 2-core box that can
    # take longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

    from flows.refresh import catalogue_refresh
    from tasks.params import LearnParams, RefreshConfig, ReviewConfig

    started = time.monotonic()
    root = Path(args.output).resolve() / "store"
    store = open_store(str(root))
    built = build_demo_store(store)
    print(f"demo store {root}: {built['pairs']} exemplar pairs in {len(STYLES)} styles (+1 broken), "
          f"{built['catalogue']} catalogue images in {built['partitions']} partitions (1 corrupt)")
    learn = LearnParams() if args.steps is None else LearnParams(steps=args.steps)
    config = RefreshConfig(store_uri=str(root), model_uri=args.model, learn=learn,
                           review=ReviewConfig(policy="auto_approve_passing"))
    summary = catalogue_refresh(config)
    print()
    print(results_table(summary))
    print()
    run = summary["run_id"]
    print(f"edited images   {where(store, edited_prefix(run))}")
    print(f"manifest        {where(store, manifest_prefix(run))}")
    print(f"contact sheets  {where(store, contact_sheets_prefix(run))}")
    print(f"published       {where(store, PUBLISHED_PREFIX)}  {summary['review'].get('published', {})}")
    print(f"run summary     {where(store, summary_key(run))}")
    print(f"wall time       {time.monotonic() - started:.0f} s")
    return summary


if __name__ == "__main__":
    main()
