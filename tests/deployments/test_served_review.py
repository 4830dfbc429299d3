"""The review gate under a served deployment, end to end: a real `prefect server start`, a
`serve()` runner in its own process, SeaweedFS S3, the tiny random model, the human review policy.

The run suspends (its process exits, no worker is held), `retouch review` resumes it, the runner
re-executes the flow from the top in a new process, and nothing before the gate is computed again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import psutil
import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from storage.manifest import read_manifest
from storage.store import open_store
from tasks.params import LearnParams, ReviewConfig
from tests.deployments.server import ROOT
from tests.flows.reliability_helpers import assert_nothing_lost, build_shop, refresh_config
from tests.tiny_models import build_tiny_ip2p

pytestmark = pytest.mark.slow

DEPLOYMENT = "catalogue-refresh/review-e2e"
RETOUCH = str(Path(sys.executable).parent / "retouch")
# Each step waits for imports of torch and diffusers in a fresh process on a loaded 2-core machine.
STEP_TIMEOUT_S = 900


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _wait_state(flow_run_id, done, what: str, serve: subprocess.Popen, log: Path) -> FlowRun:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if done(run):
                return run
            assert run.state is None or not run.state.is_final(), (
                f"run ended {run.state_name} waiting for {what}:\n{_tail(log)}")
            assert serve.poll() is None, f"the serve process exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no {what} after {STEP_TIMEOUT_S} s (now {run.state_name}):\n{_tail(log)}"
            time.sleep(1)


def _suspended(run: FlowRun) -> bool:
    return run.state is not None and run.state.type.value == "PAUSED" and run.state.name == "Suspended"


def _flow_run_pids(calls: Path) -> list[int]:
    """PIDs of the flow-run processes the runner started, in start order (the serving process is __main__)."""
    return [int(pid) for pid, event, *module in (line.split() for line in calls.read_text().splitlines())
            if event == "start" and module != ["__main__"]]


def _events(calls: Path, pid: int) -> Counter:
    return Counter(line.split()[1] for line in calls.read_text().splitlines() if int(line.split()[0]) == pid)


def _wait_exited(pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"flow-run process {pid} still alive {timeout_s} s after suspending"
        time.sleep(0.2)


def _edited_objects(seaweed_s3, s3_uri: str, run_id: str) -> dict[str, tuple[str, object]]:
    """key -> (ETag, LastModified) of every edited output: a rewrite changes LastModified."""
    bucket, prefix = s3_uri.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=seaweed_s3.endpoint_url)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/edited/run={run_id}/")
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])
            if "/contact-sheets/" not in o["Key"] and o["Key"].endswith(".png")}


def _retouch(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RETOUCH, *args], check=False, env=env, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S)


@pytest.mark.timeout(3 * STEP_TIMEOUT_S + 600)
def test_served_refresh_suspends_for_review_releases_its_process_and_resumes_without_recomputing(
    prefect_server, seaweed_s3, s3_uri, tmp_path
) -> None:
    url, _ = prefect_server
    store = open_store(s3_uri)
    index = build_shop(store, partitions=3, per_partition=4)
    model = build_tiny_ip2p(tmp_path / "tiny-ip2p")
    # No run id: the nightly deployment derives it from the flow run's scheduled start, which must
    # survive the suspend (a new run id would redo everything into new keys).
    config = refresh_config(s3_uri, "unused", str(model)).model_copy(update={
        "run_id": None, "review": ReviewConfig(policy="human", timeout_s=3600, poll_interval_s=5),
        # A named start skips the phrase-bank search, minutes of model calls on this machine.
        "learn": LearnParams(steps=2, min_pairs=2, init_instruction="make it warmer", route="instructbrush")})
    calls, log = tmp_path / "calls.txt", tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(ROOT), "RETOUCH_TEST_CALLS": str(calls),
           "PREFECT_HOME": str(tmp_path / "runner-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "tests.deployments.serve_driver", config.model_dump_json()],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            _run_the_review(serve, log, calls, env, seaweed_s3, s3_uri, store, index)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def _run_the_review(serve, log, calls, env, seaweed_s3, s3_uri, store, index) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(DEPLOYMENT)
                break
            except ObjectNotFound:
                assert serve.poll() is None and time.monotonic() < deadline, f"not served:\n{_tail(log)}"
                time.sleep(1)
    flow_run = run_deployment(DEPLOYMENT, timeout=0)

    # Round 1: the run edits everything, then suspends; its process exits and the run stays Suspended.
    run = _wait_state(flow_run.id, _suspended, "first suspend", serve, log)
    run_id = next(t.removeprefix("run:") for t in run.tags if t.startswith("run:"))
    assert run.state.state_details.pause_reschedule
    first, *_ = _flow_run_pids(calls)
    _wait_exited(first)
    time.sleep(3)  # the runner would mark a lost process Crashed right after it exits
    with get_client(sync_client=True) as client:
        assert _suspended(client.read_flow_run(flow_run.id)), "the run did not stay Suspended without a process"
    work = _events(calls, first)
    assert work["learn_routed"] == 2 and work["apply_instruction"] == 3 * 2  # 2 categories per partition
    edited = _edited_objects(seaweed_s3, s3_uri, run_id)
    assert len(edited) == len(index)
    assert all(s == "pending" for s in read_manifest(store, run_id)["review_status"])

    # The reviewer decides one category with the project's CLI; the run re-executes and asks again.
    approve = _retouch("review", "approve", run_id, "--all-passing", "--category", "warm", "--reviewer", "alice",
                       env=env)
    assert approve.returncode == 0, approve.stdout + approve.stderr
    assert "6 to approve, 0 to reject" in approve.stdout
    # (run_count stays 1 across a suspend; the second execution is told by its own process.)
    _wait_state(flow_run.id, lambda r: len(_flow_run_pids(calls)) >= 2 and _suspended(r), "second suspend",
                serve, log)
    second = _flow_run_pids(calls)[1]
    _wait_exited(second)
    reject = _retouch("review", "reject", run_id, "--reviewer", "bob", "--comment", "matte too flat", env=env)
    assert reject.returncode == 0, reject.stdout + reject.stderr
    assert "0 to approve, 6 to reject" in reject.stdout
    done = _wait_state(flow_run.id, lambda r: r.state is not None and r.state.is_completed(), "completion",
                       serve, log)

    assert done.state.is_completed()
    pids = _flow_run_pids(calls)
    assert len(pids) == 3 and len(set(pids)) == 3, "each resume runs in a new process"
    # Nothing was learned or edited again after the first suspend, the model not even loaded ...
    for pid in pids[1:]:
        assert _events(calls, pid) == Counter({"start": 1}), _events(calls, pid)
    # ... the outputs were not even rewritten ...
    assert _edited_objects(seaweed_s3, s3_uri, run_id) == edited
    # ... and Prefect returned the partitions, the ingest and the reports from its cache.
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs()
    states = {name: Counter(t.state_name for t in task_runs if t.name.startswith(name + "-"))
              for name in ("catalogue_partitions", "learn_once", "edit_partition", "report_category")}
    assert states == {"catalogue_partitions": {"Completed": 1, "Cached": 2},
                      "learn_once": {"Completed": 1, "Cached": 2},
                      "edit_partition": {"Completed": 3, "Cached": 6},
                      "report_category": {"Completed": 2, "Cached": 4}}, states

    manifest = assert_nothing_lost(store, run_id, index).set_index("image_id")
    warm, matte = manifest[manifest["category"] == "warm"], manifest[manifest["category"] == "matte"]
    assert set(warm["review_status"]) == {"approved"} and set(warm["reviewer"]) == {"alice"}
    assert set(matte["review_status"]) == {"rejected"} and set(matte["reviewer"]) == {"bob"}
    # One decision, one time: every row it decided carries the moment it was recorded.
    assert warm["reviewed_at"].nunique() == 1 and matte["reviewed_at"].nunique() == 1
    assert warm["reviewed_at"].iloc[0] < matte["reviewed_at"].iloc[0]
    assert sorted(store.list("published/")) == sorted(f"published/warm/{i}.png" for i in warm.index)
    summary = json.loads(store.get_bytes(f"runs/{run_id}/summary.json"))
    assert summary["review"]["outcome"] == "decided"
    assert summary["review"]["reviewers"] == ["alice", "bob"]
    assert summary["review"]["comments"] == ["matte too flat"]
