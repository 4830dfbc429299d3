"""A tiny shop for the reliability tests, the bad-input corpus, and the checks that nothing was lost.

Images are a few dozen pixels and the model is a random tiny InstructPix2Pix folder, so a whole
refresh takes seconds: these tests are about bookkeeping under failure, not about edit quality.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pandas as pd
from PIL import Image

from storage.layout import write_catalogue_index
from storage.manifest import read_manifest
from storage.store import Store
from tasks.params import ApplyParams, LearnParams, QCConfig, RefreshConfig, ReviewConfig

CATEGORIES = ("warm", "matte")
# A random tiny model edits nothing well; QC that passes everything makes auto-review approve (and
# so publish) every edited item, which is what the no-duplicates checks need to see.
LENIENT_QC = QCConfig(
    fail_ssim_structure=0,
    flag_ssim_structure=0,
    flag_direction_agreement=-1,
    flag_strength_min=0,
    flag_strength_max=100,
    flag_clipped_fraction=1,
    fail_clipped_fraction=1,
    fail_output_std=0,
    # A 2-step instruction on a random model is nowhere near its LUT's colours; these tests are about
    # failures of the pipeline, not of the edit.
    flag_deltae2000_mean=100,
    fail_deltae2000_mean=100,
    flag_deltae2000_p95=100,
    fail_deltae2000_p95=100,
    flag_skin_outliers=1,
    fail_skin_outliers=1,
)
SIDE = 40


def photo(seed: int, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def warmer(image: Image.Image) -> Image.Image:
    a = np.asarray(image, dtype=np.int16) + np.array([25, 5, -20])
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing huge dimensions, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def build_shop(store: Store, partitions: int = 3, per_partition: int = 4, pairs: int = 3) -> pd.DataFrame:
    """Exemplar pairs for each category and a catalogue index spread over `partitions`."""
    for c, category in enumerate(CATEGORIES):
        for p in range(pairs):
            before = photo(1000 + 10 * c + p)
            store.put_bytes(f"exemplars/{category}/pair-{p}/before.png", encoded(before))
            store.put_bytes(f"exemplars/{category}/pair-{p}/after.png", encoded(warmer(before)))
    rows = []
    for i in range(partitions * per_partition):
        image_id = f"sku-{i:03d}"
        key = f"catalogue/images/{image_id}.png"
        store.put_bytes(key, encoded(photo(i)))
        rows.append(
            {
                "image_id": image_id,
                "key": key,
                "category": CATEGORIES[i % len(CATEGORIES)],
                "partition": f"p{i // per_partition}",
            }
        )
    index = pd.DataFrame(rows)
    write_catalogue_index(store, index)
    return index


def add_bad_inputs(store: Store, index: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """Add the bad-input corpus; returns the new index and image_id -> expected error code.

    None means the input is unusual but decodable (CMYK, 16-bit) and must be edited like any other.
    """
    cmyk = Image.new("CMYK", (SIDE, SIDE), (0, 120, 200, 10))
    gray16 = Image.fromarray(np.full((SIDE, SIDE), 30000, dtype=np.uint16))
    full = encoded(photo(7), "JPEG")
    corpus: dict[str, tuple[bytes, str | None]] = {
        "bad-truncated": (full[: len(full) // 3], "truncated"),
        "bad-empty": (b"", "empty"),
        "bad-cmyk": (encoded(cmyk, "JPEG"), None),
        "bad-16bit": (encoded(gray16, "PNG"), None),
        "bad-bomb": (bomb_png(30000, 30000), "too_large"),
        "bad-notimage": (b"%PDF-1.7 this is not a photo", "not_an_image"),
    }
    rows, expected = [], {}
    for n, (image_id, (data, code)) in enumerate(sorted(corpus.items())):
        key = f"catalogue/images/{image_id}.img"
        store.put_bytes(key, data)
        rows.append({"image_id": image_id, "key": key, "category": CATEGORIES[n % 2], "partition": "p0"})
        expected[image_id] = code
    # Listed in the index but never uploaded.
    rows.append(
        {
            "image_id": "bad-missing",
            "key": "catalogue/images/bad-missing.png",
            "category": "warm",
            "partition": "p1",
        }
    )
    expected["bad-missing"] = "not_found"
    # Path-like keys: each must cost its own row, never the run (and never reach outside the root).
    for image_id, key in (("bad-dotdot", "catalogue/../../etc/passwd"), ("bad-absolute", "/etc/passwd")):
        rows.append({"image_id": image_id, "key": key, "category": "warm", "partition": "p1"})
        expected[image_id] = "invalid_key"
    # Exemplars: a pair with different sizes, a pair without its after-image, a stray nested key.
    before = photo(2000)
    store.put_bytes("exemplars/warm/pair-sizes/before.png", encoded(before))
    store.put_bytes("exemplars/warm/pair-sizes/after.png", encoded(warmer(photo(2000, (SIDE + 8, SIDE)))))
    store.put_bytes("exemplars/warm/pair-nohalf/before.png", encoded(before))
    store.put_bytes("exemplars/matte/pair-0/extra/before.png", encoded(before))
    out = pd.concat([index, pd.DataFrame(rows)], ignore_index=True)
    # write_catalogue_index refuses path-like keys, as it should; a shop's own index may still hold one.
    buf = io.BytesIO()
    out.to_parquet(buf, index=False)
    store.put_bytes("catalogue/index.parquet", buf.getvalue())
    return out, expected


def refresh_config(
    store_uri: str, run_id: str, model_dir: str, policy: str = "auto_approve_passing"
) -> RefreshConfig:
    return RefreshConfig(
        store_uri=store_uri,
        run_id=run_id,
        model_uri=model_dir,
        workers=1,
        # A named start skips the phrase-bank search (minutes of model calls on a loaded 2-core box);
        # the learned route keeps the model in every stage these failure tests exercise.
        learn=LearnParams(steps=2, min_pairs=2, init_instruction="make it warmer", route="instructbrush"),
        apply=ApplyParams(num_inference_steps=2, batch_size=4),
        qc=LENIENT_QC,
        review=ReviewConfig(policy=policy, timeout_s=60, poll_interval_s=1),
    )


def assert_nothing_lost(store: Store, run_id: str, index: pd.DataFrame) -> pd.DataFrame:
    """Exactly one manifest row per catalogue item, and published objects match approved rows 1:1."""
    manifest = read_manifest(store, run_id)
    assert sorted(manifest["image_id"]) == sorted(index["image_id"]), "manifest rows != catalogue items"
    assert not manifest["image_id"].duplicated().any()
    approved = manifest[manifest["review_status"] == "approved"]
    published = sorted(store.list("published/"))
    assert published == sorted(
        f"published/{c}/{i}.png" for c, i in zip(approved["category"], approved["image_id"], strict=True)
    )
    assert manifest[manifest["review_status"] != "approved"]["published_uri"].isna().all()
    return manifest
