"""A real `prefect server start` on loopback, and its REST API, for the deployment tests (the test
harness cannot run deployments: nothing serves or works them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited; see its log"
        try:
            if api(url, "/health") is True:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout_s} s")


def wait_workers_online(pool: str, names, timeout_s: float = 180, explain=lambda: "") -> None:
    """Block until every named worker of `pool` is online on the server (the refresh packs a night for
    the workers online when it starts); on timeout, raise naming the missing ones plus `explain()`."""
    from flows.dispatch import online_workers  # imports Prefect's client: only where it is needed

    deadline = time.monotonic() + timeout_s
    while missing := set(names) - online_workers(pool):
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(missing)} of pool {pool!r} never came online\n{explain()}")
        time.sleep(1)


@contextmanager
def running_server(folder: Path, **extra_env: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A private server (own PREFECT_HOME under `folder`, SQLite) on a free loopback port; stopped by
    its PID. Yields the API URL and an environment for processes that should talk to it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url, "PREFECT_CLI_PROMPT": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           **extra_env}
    with open(folder / "server.log", "wb") as log:
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
