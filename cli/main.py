"""The `retouch` command: one typer app; each command group lives in its own module under cli/ and
is registered here, explicitly, so a broken module fails loudly at start-up.

Every registered command is then wrapped once by `cli.common.user_errors`: the one place where a
user-facing failure becomes an `error:` line and exit 2 (`retouch --debug ...` keeps the traceback).
"""

from __future__ import annotations

import os

# Third-party noise, silenced before anything heavy is imported (setdefault: the user's setting wins).
# transformers warns twice that its image processors "require torchvision", which we never use;
# Prefect tries to send telemetry and logs an ERROR line when offline.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A first `retouch refresh` migrates a fresh embedded database; on a busy 2-core box that can take
# longer than Prefect's 20 s default (the same default as `make demo`).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from cli import dashboard, edit, instruct, models, qc, refresh, review, storage_cmds
from cli.common import settings, user_errors

app = typer.Typer(
    name="retouch",
    help=(
        "catalogue-retouch: learn retouching instructions from before/after exemplar pairs and apply "
        "them to a photo catalogue; tuning-free text edits (FPE, SimInversion); Prefect flows for "
        "the nightly refresh with QC, human review and a Parquet manifest."
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version() -> str:
    try:
        return version("catalogue-retouch")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"retouch {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    _show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    settings.debug = debug


for _module in (storage_cmds, models, instruct, edit, qc, refresh, review, dashboard):
    _module.register(app)


def _wrap_commands(typer_app: typer.Typer) -> None:
    """`user_errors` around every command, sub-apps (`retouch review ...`) included."""
    for command in typer_app.registered_commands:
        command.callback = user_errors(command.callback)
    for group in typer_app.registered_groups:
        _wrap_commands(group.typer_instance)


_wrap_commands(app)


def main() -> None:
    app()
