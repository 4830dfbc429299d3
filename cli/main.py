"""The `retouch` command: one typer app; each command group lives in its own module under cli/ and
is registered here, explicitly, so a broken module fails loudly at start-up."""

from __future__ import annotations

import typer

from cli import dashboard, edit, instruct, models, qc, refresh, review, storage_cmds

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

for _module in (storage_cmds, models, instruct, edit, qc, refresh, review, dashboard):
    _module.register(app)


def main() -> None:
    app()
