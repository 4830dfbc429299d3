"""deployments/prefect.yaml against a real `prefect server start` on loopback: `prefect deploy --all`
creates the deployments, and the scheduler creates runs for the nightly refresh and for the hourly
review expiry sweep.

The scheduler check matters: with SQLAlchemy 2.1 the server accepted the deployment and then never
scheduled a run, and the error appeared only in the server log.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.deployments.server import PREFECT, ROOT, api

pytestmark = pytest.mark.slow


def _scheduled_runs(url: str, deployment_id: str, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    runs: list = []
    while time.monotonic() < deadline and not runs:
        runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                              "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        time.sleep(2)
    return runs


def test_deploy_all_creates_deployments_and_nightly_and_hourly_runs_get_scheduled(prefect_server):
    url, env = prefect_server
    for pool in ("cpu", "gpu"):
        subprocess.run([*PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=120)
    deploy = subprocess.run(
        [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    flows = {f["id"]: f["name"] for f in api(url, "/flows/filter", {})}
    deployments = {(flows[d["flow_id"]], d["name"]): d for d in api(url, "/deployments/filter", {})}
    assert set(deployments) == {("catalogue-refresh", "nightly"), ("catalogue-refresh", "adhoc"),
                                ("refresh-partition", "gpu"), ("expire-reviews", "hourly")}
    nightly = deployments["catalogue-refresh", "nightly"]
    assert nightly["work_pool_name"] == "gpu" and deployments["catalogue-refresh", "adhoc"]["work_pool_name"] == "cpu"
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["config"]["store_uri"] == "s3://catalogue/retouch"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    sweep = deployments["expire-reviews", "hourly"]
    assert sweep["entrypoint"] == "flows/expire.py:expire_reviews" and sweep["work_pool_name"] == "cpu"
    assert [s["schedule"]["cron"] for s in sweep["schedules"]] == ["0 * * * *"]
    assert all(s["active"] for s in sweep["schedules"])
    assert sweep["parameters"] == {"store_uri": "s3://catalogue/retouch"}
    assert sweep["global_concurrency_limit"]["limit"] == 1
    assert sweep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

    runs = _scheduled_runs(url, nightly["id"])
    assert runs, "the scheduler created no runs for the nightly deployment within 60 s"
    assert all(run["parameters"]["config"]["review"]["policy"] == "human" for run in runs)
    sweeps = _scheduled_runs(url, sweep["id"])
    assert sweeps, "the scheduler created no runs for the hourly sweep within 60 s"
    starts = sorted(run["expected_start_time"] for run in sweeps)
    assert len(starts) >= 2 and all(t.split("T")[1][2:8] == ":00:00" for t in starts), starts
    assert all(run["parameters"] == {"store_uri": "s3://catalogue/retouch"} for run in sweeps)
