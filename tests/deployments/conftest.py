"""Fixtures of the deployment tests: a private Prefect server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployments.server import ROOT, running_server


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A private server (own PREFECT_HOME, SQLite) on a free loopback port; stopped by its PID.

    Yields the API URL and an environment for processes that should talk to it.
    """
    with running_server(tmp_path, RETOUCH_HOME=str(ROOT), RETOUCH_STORE_URI="s3://catalogue/retouch") as served:
        yield served
