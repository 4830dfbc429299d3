"""`retouch refresh --config FILE` (the nightly flow on any store) and `retouch demo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError


def load_refresh_config(path: Path):
    """A RefreshConfig from YAML or JSON (JSON is YAML); bad fields are refused with their names."""
    from tasks.params import RefreshConfig

    return RefreshConfig.model_validate(yaml.safe_load(path.read_text()) or {})


def refresh(
    config: Annotated[Path, typer.Option("--config", exists=True, dir_okay=False,
                                         help="YAML or JSON file holding a RefreshConfig.")],
) -> None:
    """Run catalogue_refresh once (embedded Prefect unless PREFECT_API_URL is set); prints the summary."""
    try:
        refresh_config = load_refresh_config(config)
    except ValidationError as exc:
        typer.echo(f"{config}: invalid refresh config:\n{exc}", err=True)
        raise typer.Exit(2) from None
    from flows.refresh import catalogue_refresh

    summary = catalogue_refresh(refresh_config)
    typer.echo(json.dumps(summary, sort_keys=True, default=str))


def demo(
    output: Annotated[str, typer.Option(help="Folder for the demo store.")] = "demo-output",
    steps: Annotated[int | None, typer.Option(help="Instruction learning steps.")] = None,
    model: Annotated[str | None, typer.Option(help="Model folder or s3:// prefix (default: shipped).")] = None,
) -> None:
    """Build a demo shop from sample photos and run the nightly refresh on it (same as `make demo`)."""
    from flows.demo import main

    argv = ["--output", output] + (["--steps", str(steps)] if steps is not None else [])
    main(argv + (["--model", model] if model else []))


def register(app: typer.Typer) -> None:
    app.command("refresh")(refresh)
    app.command("demo")(demo)
