"""`retouch dashboard STORE_URI [--port N]`: the monitoring dashboard (Streamlit) over a store's run
tables, on http://127.0.0.1:N.

It binds to loopback only: the page shows presigned links into the bucket, so reach it from another
machine through an SSH tunnel, not by opening the port. The Streamlit process replaces this one
(exec), so stopping the command stops the server. Needs the `dashboard` extra.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from storage.store import StoreError, open_store

APP = Path(__file__).with_name("dashboard_app.py")
STORE_ENV = "RETOUCH_DASHBOARD_STORE"
HOST = "127.0.0.1"


def streamlit_command(port: int) -> list[str]:
    """The `streamlit run` command line: loopback, no browser, no usage statistics, no Deploy button."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", HOST,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal"]


def dashboard(
    store_uri: Annotated[str, typer.Argument(help="Output store of the refresh: a folder or s3://bucket/prefix.")],
    port: Annotated[int, typer.Option(min=1024, max=65535, help="Port on 127.0.0.1.")] = 8501,
) -> None:
    """Serve the monitoring dashboard of STORE_URI: trends, QC by category, flagged items, review."""
    missing = [name for name in ("streamlit", "duckdb") if importlib.util.find_spec(name) is None]
    if missing:
        typer.echo(f"the dashboard needs {', '.join(missing)}: pip install 'catalogue-retouch[dashboard]'",
                   err=True)
        raise typer.Exit(2)
    try:
        store = open_store(store_uri)
    except StoreError as exc:
        raise typer.BadParameter(str(exc), param_hint="STORE_URI") from None
    typer.echo(f"dashboard of {store.uri} on http://{HOST}:{port}")
    command = streamlit_command(port)
    os.execve(command[0], command, {**os.environ, STORE_ENV: store.uri})


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
