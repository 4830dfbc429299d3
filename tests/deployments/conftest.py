"""Fixtures of the deployment tests: a private Prefect server."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployments.server import PREFECT, ROOT, free_port, wait_healthy


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A private server (own PREFECT_HOME, SQLite) on a free loopback port; stopped by its PID.

    Yields the API URL and an environment for processes that should talk to it.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url, "PREFECT_CLI_PROMPT": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "RETOUCH_HOME": str(ROOT), "RETOUCH_STORE_URI": "s3://catalogue/retouch"}
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, server, timeout_s=300)
            yield url, env
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
