"""`retouch eval-model` and `retouch train-model`: measure and retrain the embedded default models.

eval-model prints progress, then one JSON line holding every figure, so CI and the model cards quote
the same numbers. train-model wraps scripts/train_models.py (a source checkout is needed for it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_models.py"


def eval_model_command(
    model_dir: Annotated[str, typer.Argument(help="Model folder (with edits.json) or s3://bucket/prefix.")],
    photos: Annotated[
        Path | None,
        typer.Option(help="Folder of photos to test on (default: the photos held out of training)."),
    ] = None,
    max_photos: Annotated[int | None, typer.Option(help="Only the first N photos (sorted by name).")] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Sampler steps (default: the model card's); fewer for a quick check."),
    ] = None,
) -> None:
    """Per-instruction PSNR vs the ground-truth transforms, identity baseline, VAE and inversion PSNR."""
    from editing.evaluate import evaluate_model
    from storage.model_cache import materialise_model

    try:
        folder = materialise_model(model_dir)
        figures = evaluate_model(
            folder, photos_dir=photos, progress=True, max_photos=max_photos, steps=steps
        )
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(json.dumps(figures, sort_keys=True) + "\n")
    sys.stdout.flush()


def train_model_command(
    model: Annotated[str, typer.Argument(help="vae, ip2p, t2i or all (vae first: the UNets reuse it).")],
    seed: Annotated[int, typer.Option(help="Seed for data, init and noise.")] = 0,
    minutes: Annotated[float | None, typer.Option(help="CPU-minute budget per model.")] = None,
) -> None:
    """Retrain a shipped model from scratch into editing/weights/ (see its model card)."""
    if model not in ("vae", "ip2p", "t2i", "all"):
        typer.echo("error: model must be vae, ip2p, t2i or all", err=True)
        raise typer.Exit(2)
    if not TRAIN_SCRIPT.is_file():
        typer.echo(f"error: {TRAIN_SCRIPT} not found: train-model needs a source checkout", err=True)
        raise typer.Exit(2)
    command = [sys.executable, str(TRAIN_SCRIPT), model, "--seed", str(seed)]
    if minutes is not None:
        command += ["--minutes", str(minutes)]
    raise typer.Exit(subprocess.run(command, check=False).returncode)


def register(app: typer.Typer) -> None:
    app.command("eval-model")(eval_model_command)
    app.command("train-model")(train_model_command)
