"""The `retouch` command: one typer app; each command group lives in its own module under cli/."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="retouch",
    help=(
        "catalogue-retouch: learn retouching instructions from before/after exemplar pairs and apply "
        "them to a photo catalogue; tuning-free text edits (FPE, SimInversion); Prefect flows for "
        "the nightly refresh with QC, human review and a Parquet manifest."
    ),
    no_args_is_help=True,
    add_completion=False,
)

# Each module registers its commands on `app` when imported. A module that is not written yet is
# simply absent from the list.
for _name in ("cli.storage_cmds", "cli.models", "cli.instruct", "cli.edit", "cli.refresh", "cli.review"):
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:
            raise


def main() -> None:
    app()
