"""A refresh suspended for review resumes on another worker, with another PREFECT_HOME, and takes every
task result before the gate back from the output store (`tasks.edit.StoreResults`), as JSON.

A real `prefect server start`, the `adhoc` deployment of deployments/prefect.yaml (human review), a
cpu worker that runs the refresh until it suspends and is then stopped, and a second cpu worker with
its own PREFECT_HOME that runs the resumed execution. With Prefect's default result storage (a folder
in each worker's PREFECT_HOME) the second execution would find nothing and learn and edit again.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from uuid import UUID

import pytest
from prefect import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from storage.store import open_store
from tasks.params import ReviewConfig
from tests.deployments.server import PREFECT, ROOT, running_server
from tests.deployments.test_pool_workers import (
    STEP_TIMEOUT_S,
    build_store,
    kill_tree,
    quiet_schedules,
    refresh_config,
    start_refresh,
    start_worker,
    tail,
)
from tests.flows.reliability_helpers import assert_nothing_lost
from tests.tiny_models import build_tiny_ip2p

pytestmark = pytest.mark.slow

RETOUCH = str(Path(sys.executable).parent / "retouch")


def wait_for(flow_run_id: UUID, done, what: str, folder: Path):
    deadline = time.monotonic() + STEP_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if done(run):
                return run
            logs = "\n".join(f"--- {log.name}\n{tail(log)}" for log in sorted(folder.glob("*.log")))
            assert run.state is None or not run.state.is_final(), f"ended {run.state_name} before {what}:\n{logs}"
            assert time.monotonic() < deadline, f"no {what} after {STEP_TIMEOUT_S} s ({run.state_name}):\n{logs}"
            time.sleep(2)


def workers_of(flow_run_id: UUID) -> Counter:
    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(
            event=EventNameFilter(name=["prefect.worker.submitted-flow-run"]),
            related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=50)
    return Counter(e.resource.name for e in page.events)


@pytest.mark.timeout(3 * STEP_TIMEOUT_S + 600)
def test_a_suspended_refresh_resumes_on_another_worker_from_the_results_in_the_store(tmp_path: Path) -> None:
    folder = tmp_path
    key = secrets.token_hex(32)
    with running_server(folder, RETOUCH_SIGNING_KEY=key) as (url, env), temporary_settings({PREFECT_API_URL: url}):
        for pool in ("cpu", "gpu"):  # prefect.yaml names both
            subprocess.run([*PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                           capture_output=True, timeout=120)
        deploy = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file",
                                 "deployments/prefect.yaml"], check=False, cwd=ROOT, capture_output=True, text=True,
                                timeout=600, env={**env, "RETOUCH_HOME": str(ROOT),
                                                  "RETOUCH_STORE_URI": str(folder / "no-store")})
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        quiet_schedules()
        index = build_store(folder / "shop", {"p0": (4, 40), "p1": (4, 40), "p2": (4, 40)})
        config = refresh_config(str(folder / "shop"), "resume-elsewhere", build_tiny_ip2p(folder / "tiny-ip2p"))
        config = config.model_copy(update={"gpu_work_pool": None, "review": ReviewConfig(policy="human")})

        # 1. Worker a runs the refresh until the review gate suspends it, then goes away.
        first = start_worker(folder, env, "cpu", "cpu-a", limit=1)
        try:
            parent = start_refresh(config)
            wait_for(parent, lambda r: r.state is not None and r.state.name == "Suspended", "the suspend", folder)
        finally:
            kill_tree(first)

        # 2. The reviewer approves; worker b (its own PREFECT_HOME, empty) takes the resumed run.
        second = start_worker(folder, env, "cpu", "cpu-b", limit=1)
        try:
            approve = subprocess.run([RETOUCH, "review", "approve", "resume-elsewhere", "--all-passing",
                                      "--reviewer", "alice"], check=False, env=env, capture_output=True, text=True,
                                     timeout=STEP_TIMEOUT_S)
            assert approve.returncode == 0, approve.stdout + approve.stderr
            done = wait_for(parent, lambda r: r.state is not None and r.state.is_final(), "the end", folder)
        finally:
            kill_tree(second)
        assert done.state.is_completed(), done.state
        assert workers_of(parent) == Counter({"cpu-a": 1, "cpu-b": 1})
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs()

    # Everything before the gate came back Cached on worker b: nothing learned or edited twice.
    states = {name: Counter(t.state_name for t in task_runs if t.name.startswith(name + "-"))
              for name in ("catalogue_partitions", "learn_once", "edit_partition", "report_category")}
    assert states == {"catalogue_partitions": {"Completed": 1, "Cached": 1},
                      "learn_once": {"Completed": 1, "Cached": 1},
                      "edit_partition": {"Completed": 3, "Cached": 3},
                      "report_category": {"Completed": 2, "Cached": 2}}, states
    # The results are JSON records in the output store, none in either worker's PREFECT_HOME.
    out = open_store(config.store_uri)
    records = [json.loads(out.get_bytes(k)) for k in out.list("prefect-results/")]
    assert {r["metadata"]["serializer"]["type"] for r in records if "metadata" in r} == {"json"}
    assert not any((folder / f"home-{name}" / "storage").exists() for name in ("cpu-a", "cpu-b"))
    manifest = assert_nothing_lost(out, "resume-elsewhere", index)
    assert set(manifest["review_status"]) == {"approved"}
