"""Retrain the embedded default models from scratch: `python scripts/train_models.py vae|ip2p|t2i|all|replay`.

`replay` reproduces the shipped weights exactly: it re-runs the seeds and step counts recorded in
each folder's training.json, on 2 cores: the shared VAE 10 minutes, the ip2p UNet about 47, the t2i
UNet about 60 (`replay --kinds t2i` replays the VAE and the t2i only).

Seeded; each model stops at its CPU-minute budget (or at --steps, for a step-exact replay). The VAE
is trained first and shared by both UNets; the CLIP tokenizer is rebuilt from the BPE file inside the
open-clip-torch wheel, fetched with `pip download` (the package itself is never installed: its
torchvision dependency does not import beside our torch pin). After each UNet, the folder is saved
with `save_pretrained`, evaluated on the held-out photos and given its model card.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from editing.models import shipped_model_dir
from editing.photos import HELDOUT, PHOTO_FILES, PHOTO_LICENCES, sample_photos
from editing.training import (
    PREDICTION_TYPES,
    build_pipeline,
    clip_tokenizer_from_bpe,
    train_unet,
    train_vae,
)
from editing.transforms import EDITS, transform_ref

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BUDGET_MINUTES = {"vae": 10.0, "ip2p": 25.0, "t2i": 20.0}
PREDICTION_WORDS = {"sample": 'x0 ("sample")', "v_prediction": "v", "epsilon": "noise (epsilon)"}
MODEL_NAMES = {"ip2p": "retouch-tiny-ip2p", "t2i": "retouch-tiny-t2i"}
DEFAULTS = {
    "ip2p": {"num_inference_steps": 20, "guidance_scale": 1.0, "image_guidance_scale": 1.0},
    "t2i": {"num_inference_steps": 50, "guidance_scale": 1.0, "image_guidance_scale": None},
}


def clip_bpe(workdir: Path) -> bytes:
    """The CLIP merges file from the open-clip-torch wheel (downloaded once into workdir)."""
    wheels = glob.glob(str(workdir / "open_clip_torch-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", OPEN_CLIP_WHEEL, "-d", str(workdir)],
            check=True,
        )
        wheels = glob.glob(str(workdir / "open_clip_torch-*.whl"))
    return zipfile.ZipFile(wheels[0]).read("open_clip/bpe_simple_vocab_16e6.txt.gz")


def strip_machine_paths(folder: Path) -> None:
    """Drop `_name_or_path` from saved configs: it records where this machine loaded a component from."""
    for config_file in folder.rglob("*config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def edits_spec(kind: str) -> dict:
    """edits.json: the machine-readable contract of what the model was trained to do."""
    spec: dict = {"model": MODEL_NAMES[kind], "resolution": 64, "defaults": DEFAULTS[kind]}
    if kind == "t2i":
        spec["base_caption"] = "a photo"
        edits = [{"id": i, "caption": e.caption, "transform": transform_ref(i)} for i, e in EDITS.items()]
    else:
        edits = [{"id": i, "phrasings": e.phrasings, "transform": transform_ref(i)} for i, e in EDITS.items()]
    spec["edits"] = edits
    return spec


CONDITIONING = {
    "ip2p": "Condition dropout as in InstructPix2Pix: 5% text, 5% image, 5% both, so dual guidance works.",
    "t2i": 'Captions: the edit\'s caption for an edited crop, "a photo" for 25% unedited crops; 10% empty.',
}
GROUPED_CONDITIONING = (
    ' In the sittings with N captions per crop, each crop appears N times in its batch, under "a photo" and'
    " N-1 distinct edit captions, with one noise draw and timestep, to show what each caption changes on the"
    " same content."
)


def render_model_card(kind: str, spec: dict, figures: dict, training: dict) -> str:
    """The README of a model folder: what it was trained on, how to use it, what it measured."""
    name = spec["model"]
    photo_rows = "\n".join(
        f"| {n} | {'held out' if n in HELDOUT else 'train'} | {PHOTO_LICENCES[n]} |" for n in PHOTO_FILES
    )
    if kind == "ip2p":
        edit_rows = "\n".join(
            f"| {e['id']} | `{e['transform']}` | {'; '.join(e['phrasings'])} | "
            f"{figures['psnr_edit'][e['id']]:.2f} | {figures['psnr_identity'][e['id']]:.2f} |"
            for e in spec["edits"]
        )
        edits_table = (
            "| id | ground truth | phrasings | PSNR edit (dB) | PSNR identity (dB) |\n|---|---|---|---|---|\n"
            + edit_rows
        )
        headline = (
            f"- mean edit PSNR **{figures['psnr_edit_mean']:.2f} dB** vs identity (do nothing) "
            f"{figures['psnr_identity_mean']:.2f} dB; smallest per-edit margin over identity "
            f"{figures['psnr_edit_min_margin']:.2f} dB\n"
            f"- VAE reconstruction {figures['psnr_vae_recon']:.2f} dB"
        )
        usage = (
            "pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, local_files_only=True)\n"
            f'edited = pipe("make it warmer", image=photo_64px, num_inference_steps={spec["defaults"]["num_inference_steps"]}, '
            f"guidance_scale={spec['defaults']['guidance_scale']}, "
            f"image_guidance_scale={spec['defaults']['image_guidance_scale']}).images[0]"
        )
        short = [k for k, v in figures["psnr_edit"].items() if v < figures["psnr_identity"][k] + 3]
        headline += (
            "\n- quality bar (mean >= identity + 6 dB; every edit >= identity + 3 dB): mean "
            + ("met" if figures["psnr_edit_mean"] >= figures["psnr_identity_mean"] + 6 else "NOT met")
            + "; per edit "
            + (f"NOT met for {', '.join(short)}" if short else "met")
        )
        structure = "UNet2DConditionModel with 8 input channels (noisy latent + source latent), 4 out"
    else:
        edit_rows = "\n".join(
            f"| {e['id']} | `{e['transform']}` | {e['caption']} | {figures['psnr_caption_edit'][e['id']]:.2f} | "
            f"{figures['psnr_identity'][e['id']]:.2f} |"
            for e in spec["edits"]
        )
        edits_table = (
            "| id | ground truth | caption | PSNR invert + regenerate with caption (dB) | PSNR identity (dB) |\n"
            "|---|---|---|---|---|\n" + edit_rows
        )
        headline = (
            f'- DDIM inversion + reconstruction ("a photo", guidance 1, 50 steps): '
            f"**{figures['psnr_inversion_recon']:.2f} dB** with `editing.inversion` "
            f"({figures.get('inversion_fixed_point_iterations', 0)} fixed-point iterations per step, "
            f"the default); plain DDIM inversion {figures.get('psnr_inversion_recon_plain', float('nan')):.2f} dB\n"
            f"- VAE reconstruction {figures['psnr_vae_recon']:.2f} dB\n"
            f'- naive caption swap (invert with "a photo", regenerate with the edit caption): mean '
            f"{figures['psnr_caption_edit_mean']:.2f} dB vs identity {figures['psnr_identity_mean']:.2f} dB"
        )
        met = figures["psnr_inversion_recon"] >= figures["psnr_vae_recon"] - 2
        headline += "\n- quality bar (inversion + reconstruction >= VAE - 2 dB): " + (
            "met" if met else "NOT met"
        )
        usage = (
            "pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)\n"
            'image = pipe("a sepia photo", height=64, width=64, num_inference_steps=50, guidance_scale=1.0).images[0]'
        )
        structure = "UNet2DConditionModel with 4 input channels"
    vae = training.get("vae", {})
    stages = training["stages"]
    sittings = "; ".join(
        f"seed {st['seed']}, {st['steps']} steps, {st['minutes']} min"
        + (f", {st['captions_per_crop']} captions per crop" if st.get("captions_per_crop", 1) > 1 else "")
        for st in stages
    )
    threads = "/".join(sorted({str(st.get("threads", 1)) for st in stages}))
    prediction = PREDICTION_WORDS[stages[-1].get("prediction_type", "sample")]
    if stages[-1].get("prediction_type", "sample") == "sample":
        scheduler_note = (
            'The scheduler is DDIM with x0 ("sample") prediction; Euler Ancestral\n'
            "(the InstructPix2Pix default) refuses x0 prediction, so keep the saved scheduler."
        )
    else:
        scheduler_note = (
            f"The scheduler is DDIM with {prediction} prediction (it was trained that way;\n"
            "any diffusers scheduler built from this folder's scheduler config keeps it)."
        )
    notes = {"calibration", "carry_calibration"}
    settings = {k: v for k, v in spec["defaults"].items() if k != "text_edit"}
    if "text_edit" in spec["defaults"]:
        settings["text_edit"] = {k: v for k, v in spec["defaults"]["text_edit"].items() if k not in notes}
    notes_words = (
        "; how the text-edit values were calibrated is in `edits.json` (`calibration`, `carry_calibration`)"
        if kind == "t2i" and "text_edit" in spec["defaults"]
        else ""
    )
    carry_words = (
        "`editing.lift`"
        if kind == "ip2p"
        else "`editing.carry`: a colour LUT or the local lift, per caption as `edits.json` says"
    )
    return f"""# {name}

A tiny {"InstructPix2Pix" if kind == "ip2p" else "text-to-image (Stable Diffusion layout)"} model trained
from scratch on 2 CPU cores by `scripts/train_models.py`. It is catalogue-retouch's embedded default:
the stock diffusers `{"StableDiffusionInstructPix2PixPipeline" if kind == "ip2p" else "StableDiffusionPipeline"}`
loads it offline, so the same code runs with real weights. It knows only the {len(spec["edits"])} global
edits below, at **{spec["resolution"]} px** (latent 32x32); larger photos are edited at 64 px and the edit
is carried to full resolution ({carry_words}).

## Use
```python
{usage}
```
or `editing.models.load_model(kind="{kind}")`. Recommended settings (also in `edits.json`):
`{json.dumps(settings)}`{notes_words}. {scheduler_note}

## Measured quality
Held-out photos {", ".join(figures["photos"])}: {figures["n_images"]} views (centre square plus its four
quadrants), resized to {spec["resolution"]} px; PSNR in dB on [0, 1] images against the ground-truth
transform. Reproduce with `retouch eval-model editing/weights/{name}`.

{headline}

{edits_table}

## Architecture
- {structure}; block channels (32, 64, 64), cross-attention only at 16x16 and 8x8 latents, {prediction} prediction,
  DDPM training schedule (1000 steps, squaredcos_cap_v2); 1.66 M parameters.
- AutoencoderKL: x2 downsampling, 4 latent channels, (32, 64) channels, no mid attention; trained first on
  photo crops (MSE + 0.5 L1 + 1e-7 KL), `scaling_factor` = 1 / std of its latents; shared by both models.
- CLIPTextModel: hidden 32, 2 layers, 2 heads, the full 49408-token CLIP vocabulary, trained jointly with
  the UNet; CLIPTokenizer is the exact OpenAI CLIP BPE (from the MIT-licensed `bpe_simple_vocab_16e6.txt.gz`
  in the open-clip-torch wheel), `model_max_length` 77.

## Training
- Data: random square crops (64 px to the whole photo, log-uniform side) of the training photos below,
  resized to 64 px, random horizontal flips; a quarter of every batch is procedural (smooth colour fields
  with discs). Ground truth from `editing/transforms.py`.
- {CONDITIONING[kind]}{GROUPED_CONDITIONING if any(st.get("captions_per_crop", 1) > 1 for st in stages) else ""}
- UNet + text encoder: {training["steps"]} steps at batch 32 in {training["minutes"]} CPU-minutes, AdamW lr 5e-4,
  {threads} torch thread(s) on a shared 2-core machine, in {len(stages)} sitting(s): {sittings}.
  VAE: {vae.get("steps", "?")} steps at batch 32 (32 px windows of 64 px crops) in
  {round(vae.get("seconds", 0) / 60, 1)} minutes, seed {vae.get("seed", "?")}.
- Retrain: `python scripts/train_models.py vae --seed 0`, then
  `python scripts/train_models.py {kind} --seed 0 --minutes M` and, for each further sitting,
  `python scripts/train_models.py {kind} --resume --seed S --minutes M [--captions-per-crop N]` (`--steps N`
  instead of `--minutes` replays an exact step count), or `python scripts/train_models.py replay` for all of it.
  `training.json` holds the loss log.

## Photos
| photo | split | licence / source |
|---|---|---|
{photo_rows}

## Limits
Global photometric edits only, at 64 px; no objects, no local edits, no prompts outside the table.
Numbers are for the held-out photos above and the default settings.
"""


def write_card(kind: str, folder: Path) -> dict:
    """Evaluate the saved folder on the held-out photos and write its README model card."""
    from editing.evaluate import evaluate_model

    figures = evaluate_model(folder, kind=kind, progress=True)
    spec = json.loads((folder / "edits.json").read_text())
    training = json.loads((folder / "training.json").read_text())
    (folder / "README.md").write_text(render_model_card(kind, spec, figures, training))
    return figures


def replay(out: Path, workdir: Path, threads: int, kinds: list[str]) -> None:
    """Retrain both shipped models from scratch with the exact recipe recorded in their training.json.

    The shipped weights were trained in time-limited sittings; this replays the same seeds and step
    counts (VAE first, then each sitting of each UNet), so one command reproduces them.
    """
    recipes = {kind: json.loads((out / MODEL_NAMES[kind] / "training.json").read_text()) for kind in kinds}
    vae = next(iter(recipes.values()))["vae"]
    common = ["--out", str(out), "--workdir", str(workdir), "--threads", str(threads)]
    script = [sys.executable, str(Path(__file__).resolve())]
    subprocess.run(
        [*script, "vae", "--seed", str(vae["seed"]), "--steps", str(vae["steps"]), *common], check=True
    )
    for kind, recipe in recipes.items():
        stages = recipe["stages"]
        for index, stage in enumerate(stages):
            flags = ["--resume"] if index else []
            flags += [] if index == len(stages) - 1 else ["--no-card"]
            subprocess.run(
                [
                    *script,
                    kind,
                    "--seed",
                    str(stage["seed"]),
                    "--steps",
                    str(stage["steps"]),
                    "--prediction",
                    stage.get("prediction_type", "sample"),
                    "--captions-per-crop",
                    str(stage.get("captions_per_crop", 1)),
                    *flags,
                    *common,
                ],
                check=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["vae", "ip2p", "t2i", "all", "card", "replay"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None, help="per-model budget (default: per model)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    parser.add_argument("--out", type=Path, default=shipped_model_dir("ip2p").parent)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "retouch-train")
    parser.add_argument(
        "--kinds", nargs="*", default=["ip2p", "t2i"], help="for `card` and `replay`: which models"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--resume", action="store_true", help="continue training the UNet + text encoder saved in --out"
    )
    parser.add_argument("--no-card", action="store_true", help="skip the evaluation and model card")
    parser.add_argument(
        "--prediction",
        choices=["sample", "v_prediction", "epsilon"],
        default=None,
        help="UNet target (default: the resumed folder's, else ip2p x0 'sample', t2i 'v_prediction')",
    )
    parser.add_argument(
        "--captions-per-crop",
        type=int,
        default=1,
        help="t2i: show each crop under 'a photo' and N-1 edit captions in one batch (1 = independent crops)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.workdir.mkdir(parents=True, exist_ok=True)

    if args.model == "replay":
        replay(args.out, args.workdir, args.threads, args.kinds)
        return
    if args.model == "card":
        for kind in args.kinds:
            print(json.dumps(write_card(kind, args.out / MODEL_NAMES[kind])))
        return

    photos = list(sample_photos("train").values())
    vae_dir = args.workdir / "vae"
    if args.model in ("vae", "all"):
        vae, log = train_vae(photos, args.minutes or BUDGET_MINUTES["vae"], args.seed, args.steps)
        vae.save_pretrained(vae_dir)
        (vae_dir / "training.json").write_text(
            json.dumps({"steps": log.steps, "seconds": log.seconds, "losses": log.losses, "seed": args.seed})
        )
        print(f"vae: {log.steps} steps in {log.seconds / 60:.1f} min -> {vae_dir}")
    if args.model == "vae":
        return
    if not vae_dir.exists():
        vae_dir = args.out / MODEL_NAMES["ip2p"] / "vae"  # retrain a UNet on the shipped VAE
    tokenizer = clip_tokenizer_from_bpe(clip_bpe(args.workdir), args.workdir / "tokenizer")
    if (vae_dir / "training.json").exists():
        vae_log = json.loads((vae_dir / "training.json").read_text())
    else:  # the shipped VAE: its record lives in the shipped ip2p folder
        shipped = shipped_model_dir("ip2p") / "training.json"
        vae_log = json.loads(shipped.read_text()).get("vae", {}) if shipped.exists() else {}
    for kind in ("ip2p", "t2i") if args.model == "all" else (args.model,):
        vae = AutoencoderKL.from_pretrained(vae_dir)
        folder = args.out / MODEL_NAMES[kind]
        stages = json.loads((folder / "training.json").read_text())["stages"] if args.resume else []
        prediction = args.prediction or (
            json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
            if args.resume
            else PREDICTION_TYPES[kind]
        )
        unet, text_encoder, log = train_unet(
            kind,
            vae,
            tokenizer,
            photos,
            args.minutes or BUDGET_MINUTES[kind],
            args.seed,
            args.steps,
            resume_from=folder if args.resume else None,
            prediction_type=prediction,
            captions_per_crop=args.captions_per_crop,
        )
        build_pipeline(kind, unet, vae, text_encoder, tokenizer, prediction).save_pretrained(
            folder, safe_serialization=True
        )
        strip_machine_paths(folder)
        (folder / "edits.json").write_text(json.dumps(edits_spec(kind), indent=2) + "\n")
        if kind == "t2i":
            # The text-edit guidance calibrated for the previous weights does not carry over.
            print(
                "t2i retrained: its edits.json has no text_edit defaults and no carry choices, so text "
                "edits take the papers' values and the lift until you run scripts/calibrate_text_guidance.py "
                "and benchmarks/text_edits.py --split train and write their choices into defaults.text_edit "
                "and each edit's carry",
                file=sys.stderr,
            )
        stages.append(
            {
                "seed": args.seed,
                "prediction_type": prediction,
                "captions_per_crop": args.captions_per_crop,
                "threads": args.threads,
                "steps": log.steps,
                "minutes": round(log.seconds / 60, 1),
                "losses": log.losses,
            }
        )
        training = {
            "steps": sum(stage["steps"] for stage in stages),
            "minutes": round(sum(stage["minutes"] for stage in stages), 1),
            "stages": stages,
            "vae": {k: v for k, v in vae_log.items() if k != "losses"},
        }
        (folder / "training.json").write_text(json.dumps(training) + "\n")
        print(f"{kind}: {log.steps} steps in {log.seconds / 60:.1f} min -> {folder}")
        if not args.no_card:
            print(json.dumps(write_card(kind, folder)))


if __name__ == "__main__":
    main()
