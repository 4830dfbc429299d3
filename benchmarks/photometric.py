"""The photometric stage (issue 13): LUT application speed, LUT fit time and quality, and the
expected-colour QC on good and bad edits.

Photos are split three ways so that nothing is scored on what tuned it:
- FIT photos (training split): 10 exemplar crops of 256 px per category, from which each category's
  LUT and reference shift are fitted;
- TUNE photos (the rest of the training split): the QC's CIEDE2000 thresholds are chosen here;
- the held-out photos (coffee, flower, chelsea): every reported rate and PSNR.

Categories are global grades built from editing/transforms.py (and three compositions). A good edit
is the category's true grade; bad edits are what a broken learned stage produces: a red cast, a hue
rotation, a local red cast (a red face on an intact photo), another category's grade, over-exposure,
heavy blur and JPEG blockiness (all but the other grade on top of the true grade). A bad edit counts as caught when QC flags or fails it; a good one when it
passes. QC runs with `expected` = the category's LUT applied to the source, as the pipeline will.

Threshold rule (printed with the figures it came from): a grid search over the two flag thresholds
(dE00 mean 0.5-5, p95 1-15; fail = 2 x flag) keeps the pair that catches the most bad edits on the
TUNE photos while flagging at most 2.5% of the good edits there (at least one; the most lenient
pair among equals).

Speed: `apply_lut` on a 3840x2160 photo through Pillow (one pass, and strips on `--threads`) and
through torch `grid_sample`, median of interleaved rounds; the baseline is `grid_sample` in the same
run; then the default path on every sample photo (the kernel's time depends on the photo). Fit time: `fit_lut` from 10 pairs at the default size. On a shared machine absolute times are
pessimistic; the ratios are measured in one process.

Run: nice -n 10 .venv/bin/python -m benchmarks.photometric [--threads 2] [--skip-speed] [--skip-qc]
     [--sheet photometric_sheet.png]
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from editing import quality
from editing.metrics import psnr
from editing.photometric import apply_lut, fit_lut
from editing.photos import sample_photos
from editing.transforms import EDITS

FIT_PHOTOS = ("astronaut", "china", "grace_hopper", "hubble_deep_field", "ihc", "motorcycle_left",
              "motorcycle_right")
TUNE_PHOTOS = ("present", "retina", "rocket")
NO_CHANGE_DB = 45.0  # a "bad" edit this close to the true grade changed nothing visible


def _fn(name: str) -> Callable[[Tensor], Tensor]:
    return EDITS[name].function


GRADES: dict[str, Callable[[Tensor], Tensor]] = {
    **{name: _fn(name) for name in ("warm", "cool", "saturate", "desaturate", "sepia", "brighten", "darken",
                                    "increase_contrast", "decrease_contrast", "grayscale")},
    "warm_contrast": lambda x: _fn("increase_contrast")(_fn("warm")(x)),
    "faded_cool": lambda x: _fn("decrease_contrast")(_fn("cool")(x)),
    "green_tint": lambda x: (x * x.new_tensor((0.92, 1.08, 0.9)).view(1, 3, 1, 1)).clamp(0, 1),
}


# ------------------------------------------------------------------------------------- image helpers


def _tensor(photo: np.ndarray) -> Tensor:
    return torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255


def _image(x: Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _grade(name: str, x: Tensor) -> Tensor:
    return (GRADES[name](x[None])[0] * 255).round() / 255


def _crops(photos: dict[str, np.ndarray], count: int, side: int, seed: int) -> list[Tensor]:
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = []
    for i in range(count):
        photo = photos[names[i % len(names)]]
        height, width = photo.shape[:2]
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        out.append(_tensor(photo[top : top + side, left : left + side]))
    return out


# ----------------------------------------------------------------------------------------- bad edits


def _gains(x: Tensor, gains: tuple[float, float, float]) -> Tensor:
    return (x * x.new_tensor(gains).view(3, 1, 1)).clamp(0, 1)


def _hue_rotation(x: Tensor, degrees: float) -> Tensor:
    """Rotate every colour about the grey axis (Rodrigues): same greys, shifted hues."""
    axis = torch.full((3,), 1 / math.sqrt(3))
    angle = math.radians(degrees)
    cross = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(angle) * torch.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * torch.outer(axis, axis)
    return torch.einsum("oc,chw->ohw", rotation, x).clamp(0, 1)


def _red_patch(x: Tensor) -> Tensor:
    """A strong red cast inside a centred ellipse over ~15% of the frame: a red face on an intact photo."""
    height, width = x.shape[-2:]
    ys = torch.linspace(-1, 1, height).view(-1, 1)
    xs = torch.linspace(-1, 1, width).view(1, -1)
    inside = ((xs / 0.45) ** 2 + (ys / 0.45) ** 2 <= 1).to(x.dtype)
    return x + inside * (_gains(x, (1.3, 0.85, 0.85)) - x)


def _over_exposed(x: Tensor, stops: float = 1.0) -> Tensor:
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4) * 2**stops
    linear = linear.clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _jpeg(x: Tensor, quality_level: int = 8) -> Tensor:
    buffer = io.BytesIO()
    _image(x).save(buffer, format="JPEG", quality=quality_level)
    return _tensor(np.asarray(Image.open(buffer).convert("RGB")))


BAD_EDITS: dict[str, Callable[[Tensor], Tensor]] = {
    "red cast": lambda true: _gains(true, (1.12, 0.95, 0.95)),
    "red patch (local cast)": _red_patch,
    "hue rotation 20deg": lambda true: _hue_rotation(true, 20),
    "over-exposure +1 EV": _over_exposed,
    "heavy blur": lambda true: _fn("blur")(true[None])[0],
    "blockiness (JPEG q8)": _jpeg,
}


# ------------------------------------------------------------------------------------------ the data


def _categories(fit_photos: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each category's LUT (from 10 exemplar crops) and reference shift, with the fit time."""
    crops = _crops(fit_photos, 10, 256, seed=0)
    out = {}
    for name in GRADES:
        pairs = [(x, _grade(name, x)) for x in crops]
        started = time.perf_counter()
        lut = fit_lut(pairs)
        fit_s = time.perf_counter() - started
        reference = quality.reference_shift([(_image(b), _image(a)) for b, a in pairs])
        out[name] = {"lut": lut, "reference": reference, "fit_s": fit_s}
    return out


def _qc_items(categories: dict[str, dict], photos: dict[str, np.ndarray]) -> list[dict]:
    """Every (category, photo) with its good edit, its bad edits and the expected output. A "bad" edit
    that leaves the true grade as it was (a hue rotation of a grey image) is no bad edit: dropped."""
    items = []
    for name, category in categories.items():
        for photo_name, photo in photos.items():
            source = _tensor(photo)
            true = _grade(name, source)
            bad = {kind: edit(true) for kind, edit in BAD_EDITS.items()}
            bad.update({f"other grade: {other}": _grade(other, source) for other in GRADES if other != name})
            items.append({"category": name, "photo": photo_name, "source": _image(source), "true": _image(true),
                          "expected": apply_lut(category["lut"], _image(source)),
                          "bad": {kind: _image(x) for kind, x in bad.items() if psnr(x, true) < NO_CHANGE_DB}})
    return items


def _assessed(categories: dict, items: list[dict]) -> list[dict]:
    """The QC figures of every good and bad output (they do not depend on the thresholds)."""
    rows = []
    for item in items:
        reference = categories[item["category"]]["reference"]
        outputs = {"good: the true grade": item["true"], **{f"bad: {k}": v for k, v in item["bad"].items()}}
        for kind, output in outputs.items():
            result = quality.assess(item["source"], output, reference, expected=item["expected"])
            group = "bad: other grade" if kind.startswith("bad: other grade") else kind
            rows.append({"category": item["category"], "photo": item["photo"], "kind": kind, "group": group,
                         "result": result})
    return rows


def _status(result: quality.QCResult, thresholds: quality.QCThresholds) -> str:
    return quality.decide(result.ssim_structure, result.edit_strength, result.direction_agreement,
                          result.clipped_fraction, result.output_std, thresholds,
                          deltae_mean=result.deltae2000_mean, deltae_p95=result.deltae2000_p95,
                          skin=result.skin_outliers)[0]


def _thresholds(flag_mean: float, flag_p95: float) -> quality.QCThresholds:
    return quality.QCThresholds(flag_deltae2000_mean=flag_mean, fail_deltae2000_mean=round(2 * flag_mean, 2),
                                flag_deltae2000_p95=flag_p95, fail_deltae2000_p95=round(2 * flag_p95, 2))


# --------------------------------------------------------------------------------------------- parts


def speed(threads: int, rounds: int) -> None:
    photo = Image.fromarray(sample_photos("train")["china"]).resize((3840, 2160), Image.BICUBIC)
    crops = _crops({k: v for k, v in sample_photos("train").items() if k in FIT_PHOTOS}, 10, 256, seed=0)
    pairs = [(x, _grade("warm_contrast", x)) for x in crops]
    fit_times = []
    for _ in range(2):
        started = time.perf_counter()
        lut = fit_lut(pairs)
        fit_times.append(time.perf_counter() - started)
    tensor = _tensor(np.asarray(photo))
    runs = {
        "grid_sample (baseline)": lambda: apply_lut(lut, tensor),
        "Pillow, one pass": lambda: apply_lut(lut, photo, threads=1),
        f"Pillow, {threads} threads ({4 * threads} strips)": lambda: apply_lut(lut, photo, threads=threads),
    }
    times: dict[str, list[float]] = defaultdict(list)
    outputs = {}
    for _ in range(rounds):
        for label, run in runs.items():
            started = time.perf_counter()
            outputs[label] = run()
            times[label].append(time.perf_counter() - started)
    by_torch = (outputs["grid_sample (baseline)"] * 255).round()
    base = statistics.median(times["grid_sample (baseline)"])
    print(f"\n## Speed: apply_lut on a 3840x2160 photo (33^3 LUT, torch threads {torch.get_num_threads()}, "
          f"median of {rounds})\n")
    print("| path | s per photo | speed-up vs grid_sample | max diff vs grid_sample (levels) |")
    print("|---|---|---|---|")
    for label, values in times.items():
        median = statistics.median(values)
        output = outputs[label]
        if isinstance(output, Image.Image):
            diff = (torch.from_numpy(np.asarray(output, dtype=np.float32)).permute(2, 0, 1) - by_torch).abs().max()
        else:
            diff = torch.tensor(0.0)
        print(f"| {label} | {median:.3f} | {base / median:.2f}x | {int(diff)} |")
    print(f"\nfit_lut from 10 pairs of 256 px (size 33): {min(fit_times):.2f} s best, "
          f"{max(fit_times):.2f} s worst of 2 (target <= 10 s)")
    # Pillow's kernel time depends on the photo (0.16-0.23 s seen), so the target is judged over
    # every sample photo, not one.
    per_photo = {}
    for split in ("train", "heldout"):
        for name, array in sample_photos(split).items():
            big = Image.fromarray(array).resize((3840, 2160), Image.BICUBIC)
            runs_s = []
            for _ in range(rounds):
                started = time.perf_counter()
                apply_lut(lut, big, threads=threads)
                runs_s.append(time.perf_counter() - started)
            per_photo[name] = statistics.median(runs_s)
    values = sorted(per_photo.values())
    print(f"\nPillow on {threads} threads, each of the {len(values)} sample photos at 3840x2160 (median of "
          f"{rounds} each): mean {statistics.mean(values):.3f} s, median {statistics.median(values):.3f} s, "
          f"range {values[0]:.3f}-{values[-1]:.3f} s (slowest: {max(per_photo, key=per_photo.get)}); "
          f"{'MET' if statistics.mean(values) <= 0.2 else 'MISSED'} <= 0.2 s per photo on average")


def fit_quality(categories: dict[str, dict], heldout: dict[str, np.ndarray]) -> None:
    print("\n## Fit quality on held-out photos (PSNR dB against the true grade, mean CIEDE2000)\n")
    print("| category | identity dB | LUT dB | LUT mean dE00 | fit s |")
    print("|---|---|---|---|---|")
    scores = []
    for name, category in categories.items():
        sources = [_tensor(photo) for photo in heldout.values()]
        truths = [_grade(name, x) for x in sources]
        fitted = [_tensor(np.asarray(apply_lut(category["lut"], _image(x)))) for x in sources]
        identity_db = statistics.mean(psnr(x, t) for x, t in zip(sources, truths))
        lut_db = statistics.mean(psnr(f, t) for f, t in zip(fitted, truths))
        deltae = statistics.mean(float(quality.deltae2000(f.permute(1, 2, 0).double().numpy(),
                                                          t.permute(1, 2, 0).double().numpy()).mean())
                                 for f, t in zip(fitted, truths))
        scores.append(lut_db)
        print(f"| {name} | {identity_db:.1f} | {lut_db:.1f} | {deltae:.2f} | {category['fit_s']:.1f} |")
    print(f"\nLUT: worst {min(scores):.1f} dB, mean {statistics.mean(scores):.1f} dB (target >= 38 dB)")


def tune_thresholds(rows: list[dict]) -> quality.QCThresholds:
    """The flag thresholds (fail = 2 x flag) that catch the most bad edits on the TUNE photos while at
    most 2.5% of the good edits there (rounded, at least one) are flagged; among equals, the most
    lenient."""
    good = [row["result"] for row in rows if row["kind"].startswith("good")]
    bad = [row["result"] for row in rows if row["kind"].startswith("bad")]
    allowed = max(1, round(0.025 * len(good)))
    best = None
    for flag_mean in np.arange(0.5, 5.01, 0.1):
        for flag_p95 in np.arange(1.0, 15.01, 0.25):
            thresholds = _thresholds(round(float(flag_mean), 2), round(float(flag_p95), 2))
            flagged_good = sum(_status(r, thresholds) != "pass" for r in good)
            if flagged_good > allowed:
                continue
            caught = sum(_status(r, thresholds) != "pass" for r in bad)
            key = (caught, flag_mean + flag_p95)
            if best is None or key > best[0]:
                best = (key, thresholds)
    tuned = best[1]
    print(f"\n## QC thresholds tuned on the TUNE photos ({', '.join(TUNE_PHOTOS)}; {len(good)} good and "
          f"{len(bad)} bad edits)\n")
    print(f"good edits' dE00: mean up to {max(r.deltae2000_mean for r in good):.2f}, p95 up to "
          f"{max(r.deltae2000_p95 for r in good):.2f}; chosen: flag mean {tuned.flag_deltae2000_mean:.2f} / fail "
          f"{tuned.fail_deltae2000_mean:.2f}, flag p95 {tuned.flag_deltae2000_p95:.2f} / fail "
          f"{tuned.fail_deltae2000_p95:.2f}")
    default = quality.QCThresholds()
    shipped = (default.flag_deltae2000_mean, default.fail_deltae2000_mean, default.flag_deltae2000_p95,
               default.fail_deltae2000_p95)
    found = (tuned.flag_deltae2000_mean, tuned.fail_deltae2000_mean, tuned.flag_deltae2000_p95,
             tuned.fail_deltae2000_p95)
    if not np.allclose(shipped, found):
        print(f"NOTE: the QCThresholds defaults {shipped} differ from these tuned values {found}")
    return tuned


def qc_rates(rows: list[dict], thresholds: quality.QCThresholds, label: str) -> None:
    print(f"\n## QC on {label}\n")
    print("| edit | items | pass | flag | fail | caught (flag or fail) | dE00 mean (median) | dE00 p95 (median) |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[str, list] = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    for group, members in groups.items():
        statuses = [_status(row["result"], thresholds) for row in members]
        counts = {s: statuses.count(s) for s in ("pass", "flag", "fail")}
        print(f"| {group} | {len(members)} | {counts['pass']} | {counts['flag']} | {counts['fail']} | "
              f"{100 * (counts['flag'] + counts['fail']) / len(members):.1f}% | "
              f"{statistics.median(row['result'].deltae2000_mean for row in members):.2f} | "
              f"{statistics.median(row['result'].deltae2000_p95 for row in members):.2f} |")
    good = [row for row in rows if row["kind"].startswith("good")]
    bad = [row for row in rows if row["kind"].startswith("bad")]
    passed = sum(_status(row["result"], thresholds) == "pass" for row in good)
    caught = sum(_status(row["result"], thresholds) != "pass" for row in bad)
    print(f"\ngood edits passing: {100 * passed / len(good):.1f}% of {len(good)} (target >= 95%); bad edits "
          f"flagged or failed: {100 * caught / len(bad):.1f}% of {len(bad)} (target >= 95%)")
    print(f"good edits' dE00 here: mean up to {max(row['result'].deltae2000_mean for row in good):.2f}, "
          f"p95 up to {max(row['result'].deltae2000_p95 for row in good):.2f}")
    for row in rows:
        r = row["result"]
        status, reasons = quality.decide(r.ssim_structure, r.edit_strength, r.direction_agreement,
                                         r.clipped_fraction, r.output_std, thresholds,
                                         deltae_mean=r.deltae2000_mean, deltae_p95=r.deltae2000_p95,
                                         skin=r.skin_outliers)
        if (status != "pass") == row["kind"].startswith("good"):
            print(f"  {row['kind']} on {row['category']}/{row['photo']}: {status} (dE00 mean "
                  f"{r.deltae2000_mean:.2f}, p95 {r.deltae2000_p95:.2f}, ssim_structure {r.ssim_structure:.2f}) "
                  f"{', '.join(reasons)}")


def contact_sheet(items: list[dict], path: str) -> None:
    """Rows: three categories on each held-out photo, each row headed by its name; columns: before,
    the true grade, the fitted LUT, and two bad edits of the true grade."""
    picks = [item for item in items if item["category"] in ("warm_contrast", "sepia", "faded_cool")]
    columns = {"before": "source", "true": "true", "LUT": "expected"}
    bad_columns = ("red cast", "red patch (local cast)", "hue rotation 20deg")
    width, label = 220, 14
    thumbs = []
    for item in picks:
        cells = [item[key] for key in columns.values()] + [item["bad"].get(kind, item["true"]) for kind in bad_columns]
        row = []
        for cell in cells:
            thumb = cell.copy()
            thumb.thumbnail((width - 4, width - 4))
            row.append(thumb)
        thumbs.append(row)
    heights = [label + max(t.height for t in row) + 4 for row in thumbs]
    sheet = Image.new("RGB", (width * (len(columns) + len(bad_columns)), label + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate([*columns, *bad_columns]):
        draw.text((c * width + 4, 1), name, fill="black")
    top = label
    for item, row, height in zip(picks, thumbs, heights):
        draw.text((4, top + 1), f"{item['category']} / {item['photo']}", fill="black")
        for c, thumb in enumerate(row):
            sheet.paste(thumb, (c * width + 2, top + label))
        top += height
    sheet.save(path)
    print(f"\ncontact sheet: {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (median)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-qc", action="store_true")
    parser.add_argument("--sheet", default=None, help="write a contact sheet PNG of held-out items here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.skip_speed:
        speed(args.threads, args.rounds)
    if args.skip_qc and not args.sheet:
        return
    train = sample_photos("train")
    categories = _categories({k: v for k, v in train.items() if k in FIT_PHOTOS})
    heldout = sample_photos("heldout")
    fit_quality(categories, heldout)
    heldout_items = _qc_items(categories, heldout)
    if not args.skip_qc:
        tune_rows = _assessed(categories, _qc_items(categories, {k: v for k, v in train.items() if k in TUNE_PHOTOS}))
        thresholds = tune_thresholds(tune_rows)
        qc_rates(tune_rows, thresholds, "the TUNE photos (where the thresholds were chosen)")
        qc_rates(_assessed(categories, heldout_items), thresholds, "the held-out photos")
    if args.sheet:
        contact_sheet(heldout_items, args.sheet)


if __name__ == "__main__":
    main()
