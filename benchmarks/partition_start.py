"""What a partition run on the LUT route costs before its first item (issue 16): its process start, and
the photometric stage without torch.

A pool worker starts every partition run as a new Python process that imports the flow's modules
(`flows.refresh`). Since session 11 the LUT route imports no torch, so that start is shorter and
lighter. Two measurements, each against a baseline in the same run:

1. Process start: wall time and peak RSS of a fresh `python -c "import flows.refresh"`, against the
   same process that also imports torch first (what every partition run paid before), alternated
   `--rounds` times; medians.
2. The light field's 8-bit path on a 3840x2160 photo, now numpy (separable bilinear maps, in place),
   against the torch path it replaced (`F.interpolate` maps, in-place tensor ops), interleaved rounds;
   medians. Both give the same pixels (checked).

Run alone on the machine: nice -n 10 .venv/bin/python -m benchmarks.partition_start [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, time
started = time.perf_counter()
{prelude}
import flows.refresh
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "torch" in sys.modules)
"""


def start_once(with_torch: bool) -> tuple[float, float, float, bool]:
    """(process wall s, import s, peak RSS MB, torch loaded) of one fresh interpreter."""
    code = CHILD.format(prelude="import torch" if with_torch else "")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    imports, rss, torch_loaded = done.stdout.split()
    return wall, float(imports), float(rss), torch_loaded == "True"


def process_start(rounds: int) -> dict:
    samples: dict[str, list[tuple[float, float, float, bool]]] = {"without torch": [], "with torch": []}
    for _ in range(rounds):
        samples["without torch"].append(start_once(False))
        samples["with torch"].append(start_once(True))
    if any(s[3] for s in samples["without torch"]):
        raise SystemExit("importing flows.refresh loaded torch: the LUT route's start is not torch-free")
    return {name: {"wall_s": statistics.median(s[0] for s in rows),
                   "import_s": statistics.median(s[1] for s in rows),
                   "rss_mb": statistics.median(s[2] for s in rows)} for name, rows in samples.items()}


def torch_light_field(field, image: Image.Image) -> Image.Image:
    """The 8-bit light-field path as it was before session 11 (torch), the baseline."""
    import torch
    import torch.nn.functional as F

    maps = torch.tensor(np.stack([field.gain, field.offset]))[None]
    gain, offset = F.interpolate(maps, size=(image.height, image.width), mode="bilinear", align_corners=True)[0]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    pixels.mul_(gain.unsqueeze(-1)).add_(offset.mul_(255).unsqueeze(-1)).clamp_(0, 255).add_(0.5)
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def light_field_speed(rounds: int) -> dict:
    from editing.light_field import LightField, apply_light_field
    from editing.photos import sample_photos

    photo = Image.fromarray(next(iter(sample_photos("train").values()))).resize((3840, 2160), Image.BICUBIC)
    grid = np.linspace(-1, 1, 9)
    radius = grid[:, None] ** 2 + grid[None, :] ** 2
    field = LightField(1 - 0.25 * radius / radius.max(), 0.02 * np.ones((9, 9)))
    new, old = apply_light_field(field, photo), torch_light_field(field, photo)
    differing = float(np.mean(np.asarray(new) != np.asarray(old)))
    largest = int(np.abs(np.asarray(new, dtype=np.int16) - np.asarray(old, dtype=np.int16)).max())
    times: dict[str, list[float]] = {"numpy": [], "torch": []}
    for _ in range(rounds):
        for name, fn in (("numpy", apply_light_field), ("torch", torch_light_field)):
            started = time.perf_counter()
            fn(field, photo)
            times[name].append(time.perf_counter() - started)
    return {"numpy_s": statistics.median(times["numpy"]), "torch_s": statistics.median(times["torch"]),
            "pixels_differing": differing, "largest_difference": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="alternations of each measurement")
    args = parser.parse_args()
    start = process_start(args.rounds)
    print(json.dumps({"process_start": start}))
    lean, heavy = start["without torch"], start["with torch"]
    print("| partition process | wall s | imports s | peak RSS MB |")
    print("|---|---|---|---|")
    for name, row in start.items():
        print(f"| {name} | {row['wall_s']:.2f} | {row['import_s']:.2f} | {row['rss_mb']:.0f} |")
    print(f"without torch / with torch: wall {lean['wall_s'] / heavy['wall_s']:.2f}x, "
          f"RSS {lean['rss_mb'] / heavy['rss_mb']:.2f}x")
    field = light_field_speed(args.rounds)
    print(json.dumps({"light_field_4k": field}))
    print(f"light field on 3840x2160: numpy {field['numpy_s']:.3f} s, torch {field['torch_s']:.3f} s "
          f"({field['numpy_s'] / field['torch_s']:.2f}x); pixels differing {100 * field['pixels_differing']:.3f} %, "
          f"by at most {field['largest_difference']}")


if __name__ == "__main__":
    main()
