"""deployments/prefect.yaml against a real `prefect server start` on loopback: `prefect deploy --all`
creates the deployments, and the scheduler creates runs for the nightly cron.

The scheduler check matters: with SQLAlchemy 2.1 the server accepted the deployment and then never
scheduled a run, and the error appeared only in the server log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited; see its log"
        try:
            if _api(url, "/health") is True:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout_s} s")


@pytest.fixture
def prefect_server(tmp_path: Path):
    """A private server (own PREFECT_HOME, SQLite) on a free loopback port; stopped by its PID."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url, "PREFECT_CLI_PROMPT": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "RETOUCH_HOME": str(ROOT), "RETOUCH_STORE_URI": "s3://catalogue/retouch"}
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, server, timeout_s=300)
            yield url, env
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def test_deploy_all_creates_deployments_and_nightly_runs_get_scheduled(prefect_server):
    url, env = prefect_server
    for pool in ("cpu", "gpu"):
        subprocess.run([*PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=120)
    deploy = subprocess.run(
        [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    deployments = {f"{d['name']}": d for d in _api(url, "/deployments/filter", {})}
    assert set(deployments) == {"nightly", "adhoc", "gpu"}
    nightly = deployments["nightly"]
    assert nightly["work_pool_name"] == "gpu" and deployments["adhoc"]["work_pool_name"] == "cpu"
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["config"]["store_uri"] == "s3://catalogue/retouch"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    deadline = time.monotonic() + 60
    runs: list = []
    while time.monotonic() < deadline and not runs:
        runs = _api(url, "/flow_runs/filter",
                    {"deployments": {"id": {"any_": [nightly["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        time.sleep(2)
    assert runs, "the scheduler created no runs for the nightly deployment within 60 s"
    assert all(run["parameters"]["config"]["review"]["policy"] == "human" for run in runs)
