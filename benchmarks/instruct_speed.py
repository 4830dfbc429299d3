"""InstructBrush application throughput against a per-image loop of the stock IP2P pipeline.

Fair comparison: the same shipped model, steps, guidance scales, images (at the native size, so
the stock pipeline does no resizing) and per-image seeds, and the same instruction embedding: a
text instruction's encoder states go to the stock pipeline as `prompt_embeds` and to our batched
path as the instruction. Outputs must agree within tolerance; the ratio is images/s ours / stock.
Also reports the full `apply_instruction` (with lifting to full resolution) and the wall time of
learning one category with the default settings.

`--dtype bfloat16` runs both paths in bfloat16 (same dtype, same comparison) and also times the
stock loop in float32, reporting our ratio and output difference against that float32 reference.

Run: nice -n 10 .venv/bin/python -m benchmarks.instruct_speed [--images 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from editing.instruct import (
    ApplyConfig,
    InstructionPair,
    LearnConfig,
    apply_instruction,
    edit_native,
    learn_instruction,
    phrase_instruction,
)
from editing.instruct.ops import pil_to_tensor, tensor_to_pil, to_native
from editing.metrics import psnr
from editing.models import DTYPES, load_model, native_resolution
from editing.photos import sample_photos
from editing.transforms import increase_contrast, warm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="text guidance scale (default: the model's); learned instructions may default to > 1, "
        "which runs the 3-row dual guidance",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="compute dtype of both paths; other than float32 also times a float32 stock reference",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(dtype=args.dtype)
    reference = load_model() if args.dtype != "float32" else None
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    defaults = (model.spec or {}).get("defaults", {})
    resolution = native_resolution(model.pipe, model.spec)
    steps = int(defaults.get("num_inference_steps", 20))
    text_scale = args.guidance if args.guidance is not None else float(defaults.get("guidance_scale", 7.5))
    image_scale = float(defaults.get("image_guidance_scale", 1.5))
    rng = np.random.default_rng(0)
    photos = list(sample_photos("heldout").values())
    fulls = []
    for i in range(args.images):
        photo = photos[i % len(photos)]
        side = int(rng.integers(160, min(photo.shape[:2]) + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        fulls.append(
            torch.from_numpy(photo[top : top + side, left : left + side].copy()).permute(2, 0, 1) / 255.0
        )
    natives = torch.cat([to_native(x[None].float(), resolution) for x in fulls])
    native_pils = [tensor_to_pil(x) for x in natives]
    natives = torch.stack([pil_to_tensor(p) for p in native_pils])  # exactly what the stock pipeline sees
    seeds = list(range(1000, 1000 + args.images))
    instruction = phrase_instruction(model, "make it warmer", "warm")
    print(
        f"model {model.model_id}, {args.images} images at {resolution} px, {steps} steps, "
        f"guidance {text_scale}/{image_scale}, threads {args.threads}, dtype {args.dtype}"
    )

    def stock_loop(stock_pipe=pipe, context=instruction.context, images=native_pils) -> torch.Tensor:
        return torch.stack(
            [
                stock_pipe(
                    prompt_embeds=context[None],
                    image=image,
                    num_inference_steps=steps,
                    guidance_scale=text_scale,
                    image_guidance_scale=image_scale,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="pt",
                ).images[0].float()
                for image, seed in zip(images, seeds[: len(images)], strict=True)
            ]
        )

    def reference_loop() -> torch.Tensor:
        return stock_loop(reference.pipe, phrase_instruction(reference, "make it warmer").context)

    # warm-up every path once at the shapes it is timed at (first calls allocate and pick kernels)
    stock_loop(images=native_pils[:1])
    edit_native(pipe, instruction.bank(pipe), natives, seeds, steps, text_scale, image_scale)
    if reference is not None:
        stock_loop(reference.pipe, phrase_instruction(reference, "make it warmer").context, native_pils[:1])

    def batched() -> torch.Tensor:
        return edit_native(pipe, instruction.bank(pipe), natives, seeds, steps, text_scale, image_scale)

    def lifted() -> list:
        return apply_instruction(
            model,
            instruction,
            [tensor_to_pil(x) for x in fulls],
            ApplyConfig(
                batch_size=args.images,
                num_inference_steps=steps,
                guidance_scale=text_scale,
                image_guidance_scale=image_scale,
                dtype=args.dtype,
            ),
            seeds=seeds,
        )

    def timed(fn):
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    # Rounds interleave the paths, so load from anything else on the machine hits all of them
    # alike; the ratios reported are the medians of the per-round ratios.
    rounds = []
    for index in range(args.rounds):
        stock_s, stock = timed(stock_loop)
        ours_s, ours = timed(batched)
        full_s, _ = timed(lifted)
        ref_s, ref = timed(reference_loop) if reference is not None else (stock_s, stock)
        max_diff = float((ours - stock).abs().max())
        ref_diff = float((ours - ref).abs().max())
        ref_psnr = psnr(ours, ref)
        rounds.append((stock_s, ours_s, full_s, max_diff, ref_s, ref_diff, ref_psnr))
        line = (
            f"round {index + 1}: stock {args.images / stock_s:.2f} images/s, batched "
            f"{args.images / ours_s:.2f} ({stock_s / ours_s:.2f}x), with lifting {args.images / full_s:.2f} "
            f"({stock_s / full_s:.2f}x); max |ours - stock| {max_diff:.1e}"
        )
        if reference is not None:
            line += f"; float32 stock {args.images / ref_s:.2f} images/s ({ref_s / ours_s:.2f}x)"
        print(line)
    stock_s, ours_s, full_s = (float(np.median([r[i] for r in rounds])) for i in range(3))
    native_ratio = float(np.median([r[0] / r[1] for r in rounds]))
    lift_ratio = float(np.median([r[0] / r[2] for r in rounds]))
    max_diff = max(r[3] for r in rounds)

    print(f"stock pipeline loop : {args.images / stock_s:6.2f} images/s ({stock_s:.1f} s, median)")
    print(f"batched (native)    : {args.images / ours_s:6.2f} images/s ({ours_s:.1f} s)")
    print(f"batched + lift      : {args.images / full_s:6.2f} images/s ({full_s:.1f} s, full resolution)")
    print(
        f"throughput ratio    : {native_ratio:.2f}x native, {lift_ratio:.2f}x with lifting "
        f"(median of {args.rounds} rounds, both in {args.dtype}; target >= 3x)"
    )
    print(f"max |ours - stock|  : {max_diff:.2e} (images in [0, 1], both in {args.dtype})")
    if reference is not None:
        ref_s = float(np.median([r[4] for r in rounds]))
        print(
            f"vs float32 stock    : {args.images / ref_s:6.2f} images/s ({ref_s:.1f} s); ours "
            f"{float(np.median([r[4] / r[1] for r in rounds])):.2f}x native, "
            f"{float(np.median([r[4] / r[2] for r in rounds])):.2f}x with lifting; max |ours - float32 "
            f"stock| {max(r[5] for r in rounds):.2e}, PSNR {min(r[6] for r in rounds):.1f} dB"
        )

    if not args.skip_learning:
        photo = photos[0]
        pairs = []
        for i in range(10):
            side = int(rng.integers(96, 256))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            x = torch.from_numpy(photo[top : top + side, left : left + side].copy()).permute(2, 0, 1) / 255.0
            pairs.append(
                InstructionPair(f"p{i}", tensor_to_pil(x), tensor_to_pil(increase_contrast(warm(x[None]))[0]))
            )
        started = time.perf_counter()
        learned = learn_instruction(reference or model, pairs, LearnConfig(), category="warm_contrast")
        learn_s = time.perf_counter() - started
        print(
            f"learning one category: {learn_s:.1f} s for 10 pairs, {learned.metadata['steps']} steps "
            f"(target <= 180 s); init {learned.instruction!r}"
        )


if __name__ == "__main__":
    main()
