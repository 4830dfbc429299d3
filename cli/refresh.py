"""`retouch refresh --config FILE` (the nightly flow on any store) and `retouch demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlparse

import typer
import yaml
from pydantic import BaseModel

from cli.common import UserError


def load_refresh_config(path: Path):
    """A RefreshConfig from YAML or JSON (JSON is YAML); bad fields are refused with their names."""
    from tasks.params import RefreshConfig

    return RefreshConfig.model_validate(yaml.safe_load(path.read_text()) or {})


def config_template(model: type[BaseModel], indent: int = 0) -> list[str]:
    """A commented YAML template of `model`: each field's description, then its default (nested
    configs expanded); required fields are left empty and say so."""
    pad = "  " * indent
    lines: list[str] = []
    for name, field in model.model_fields.items():
        lines.extend(f"{pad}# {line}" for line in (field.description or "").splitlines())
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(config_template(nested, indent + 1))
        elif field.is_required():
            lines.append(f"{pad}{name}:  # required")
        else:
            default = field.get_default(call_default_factory=True)
            value = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip()
            lines.append(f"{pad}{name}: {value.removesuffix('...').strip()}")
    return lines


def plain(uri: str) -> str:
    """`file:///a/run%3Dx` -> `/a/run=x`: a path a user can paste into `ls` or `retouch ls`."""
    return unquote(urlparse(uri).path) if uri.startswith("file://") else uri


def summary_table(summary: dict) -> str:
    """The run summary for a person: where things are (plain paths), then one line per category."""
    review = summary.get("review") or {}
    rows = [
        ("run", summary.get("run_id")),
        ("store", plain(str(summary.get("store_uri")))),
        ("output", plain(str(summary.get("output_uri")))),
        ("edited", plain(str(summary.get("edited_uri")))),
        ("manifest", plain(str(summary.get("manifest_uri")))),
        ("partitions", ", ".join(f"{k} {v}" for k, v in (summary.get("partitions") or {}).items())),
        ("instructions", ", ".join(f"{k} {v}" for k, v in (summary.get("instructions") or {}).items())),
        ("review", f"{review.get('outcome', '-')}; "
                   + ", ".join(f"{k} {v}" for k, v in (review.get("review_status") or {}).items())),
        ("total time", f"{(summary.get('timings_s') or {}).get('total', '?')} s"),
    ]
    lines = [f"{label:<13} {value}" for label, value in rows]
    if summary.get("categories"):
        from flows.demo import results_table

        lines += ["", results_table(summary)]
    return "\n".join(lines)


def refresh(
    config: Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                help="YAML or JSON file holding a RefreshConfig.")] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print a commented YAML template of every setting and exit.")
    ] = False,
    as_json: Annotated[
        bool | None,
        typer.Option("--json/--table", help="Summary as one JSON line, or a table (default: a table on a "
                     "terminal, JSON when piped)."),
    ] = None,
) -> None:
    """Run catalogue_refresh once (embedded Prefect unless PREFECT_API_URL is set); prints the summary.

    Example: retouch refresh --print-config > refresh.yaml; edit store_uri; retouch refresh --config refresh.yaml"""
    from tasks.params import RefreshConfig

    if print_config:
        typer.echo("\n".join(config_template(RefreshConfig)))
        return
    if config is None:
        raise UserError("give --config FILE (start from `retouch refresh --print-config`)")
    refresh_config = load_refresh_config(config)
    from flows.refresh import catalogue_refresh

    summary = catalogue_refresh(refresh_config)
    if as_json if as_json is not None else not sys.stdout.isatty():
        typer.echo(json.dumps(summary, sort_keys=True, default=str))
    else:
        typer.echo(summary_table(summary))


def demo(
    output: Annotated[str, typer.Option(help="Folder for the demo store.")] = "demo-output",
    steps: Annotated[int | None, typer.Option(help="Instruction learning steps.")] = None,
    model: Annotated[str | None, typer.Option(help="Model folder or s3:// prefix (default: shipped).")] = None,
) -> None:
    """Build a demo shop from sample photos and run the nightly refresh on it (same as `make demo`).

    Example: retouch demo --output demo-output --steps 50"""
    from flows.demo import main

    argv = ["--output", output] + (["--steps", str(steps)] if steps is not None else [])
    main(argv + (["--model", model] if model else []))


def register(app: typer.Typer) -> None:
    app.command("refresh")(refresh)
    app.command("demo")(demo)
