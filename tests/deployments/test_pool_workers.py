"""Partitions on real Prefect workers, end to end: a `prefect server start` on loopback, process work
pools `cpu` and `gpu`, the deployments of deployments/prefect.yaml, two `prefect worker start --pool
gpu` processes and one on `cpu`, and refreshes started through `catalogue-refresh/adhoc` with
`gpu_work_pool: gpu`.

The store is a local folder and both categories take the LUT route, so a partition costs little and
what is tested is the orchestration: which worker ran what, and what survives a worker that is lost
mid-partition. The workers start outside the checkout and the deployments are registered with another
machine's RETOUCH_HOME, so the pull step must find each worker's own checkout at run time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pandas as pd
import psutil
import pytest
from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from storage.layout import write_catalogue_index
from storage.run_layout import done_key
from storage.store import open_store
from tasks.params import ApplyParams, LearnParams, RefreshConfig, ReviewConfig
from tests.deployments.server import PREFECT, ROOT, running_server, wait_workers_online
from tests.flows.reliability_helpers import LENIENT_QC, assert_nothing_lost, encoded, photo, warmer
from tests.tiny_models import build_tiny_ip2p

pytestmark = pytest.mark.slow

PARTITIONS = "refresh-partition/gpu"
GPU_WORKERS = ("gpu-a", "gpu-b")
# Registered as if from another machine: no worker has this folder.
DEPLOYING_MACHINE_HOME = "/nonexistent/deploying-machine/catalogue-retouch"
# Every step starts fresh Python processes that import torch, on a loaded 2-core machine.
STEP_TIMEOUT_S = 900
# Above the start of a flow run on a loaded machine (the Pending -> Running gap has no heartbeat).
SILENCE_S = 90
BIG = 48


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    workers: dict[str, subprocess.Popen]
    model: Path

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{tail(log)}" for log in sorted(self.folder.glob("*.log")))


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_worker(folder: Path, env: dict[str, str], pool: str, name: str, limit: int) -> subprocess.Popen:
    """A worker with its own PREFECT_HOME, started in a folder that is not the checkout, the way the
    guide starts one."""
    workdir = folder / f"cwd-{name}"
    workdir.mkdir()
    worker_env = {**env, "PREFECT_HOME": str(folder / f"home-{name}"), "RETOUCH_HOME": str(ROOT),
                  "PREFECT_WORKER_QUERY_SECONDS": "2"}
    with open(folder / f"worker-{name}.log", "wb") as log:
        # As deployments/README.md starts them: SIGINT back to its default, whatever this process
        # inherited (a test run started with `&` from a script ignores it, and so would the worker).
        return subprocess.Popen(["env", "--default-signal=INT", *PREFECT, "worker", "start", "--pool", pool,
                                 "--name", name, "--limit", str(limit)],
                                cwd=workdir, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def process_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen) -> None:
    for p in process_tree(proc):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)


def quiet_schedules() -> None:
    """No nightly or hourly run may take a worker during the test."""
    with get_client(sync_client=True) as client:
        for name in ("catalogue-refresh/nightly", "expire-reviews/hourly"):
            deployment = client.read_deployment_by_name(name)
            client.pause_deployment(deployment.id)
            for run in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))):
                client.delete_flow_run(run.id)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("pool-workers")
    with running_server(folder) as (url, env):
        for pool in ("cpu", "gpu"):
            subprocess.run([*PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                           capture_output=True, timeout=120)
        deploy = subprocess.run(
            [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
            env={**env, "RETOUCH_HOME": DEPLOYING_MACHINE_HOME, "RETOUCH_STORE_URI": str(folder / "no-store")})
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        workers: dict[str, subprocess.Popen] = {}
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                quiet_schedules()
                workers["cpu-a"] = start_worker(folder, env, "cpu", "cpu-a", limit=2)
                for name in GPU_WORKERS:
                    # One run at a time, like a worker per GPU: a second partition must go to the other.
                    workers[name] = start_worker(folder, env, "gpu", name, limit=1)
                # The refresh packs the night for the gpu workers online when it starts.
                wait_workers_online(
                    "gpu", GPU_WORKERS, explain=lambda: "\n".join(tail(folder / f"worker-{n}.log") for n in GPU_WORKERS)
                )
                yield Cluster(folder, env, workers, build_tiny_ip2p(folder / "tiny-ip2p"))
            finally:
                for worker in workers.values():
                    kill_tree(worker)


def build_store(root: Path, sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """Exemplar pairs of two categories and a catalogue of partition -> (items, side in pixels)."""
    store = open_store(str(root))
    for c, category in enumerate(("warm", "matte")):
        for p in range(3):
            before = photo(1000 + 10 * c + p)
            store.put_bytes(f"exemplars/{category}/pair-{p}/before.png", encoded(before))
            store.put_bytes(f"exemplars/{category}/pair-{p}/after.png", encoded(warmer(before)))
    rows = []
    for partition, (count, side) in sizes.items():
        for i in range(count):
            image_id = f"{partition}-sku-{i:03d}"
            key = f"catalogue/images/{image_id}.png"
            store.put_bytes(key, encoded(photo(len(rows), (side, side))))
            rows.append({"image_id": image_id, "key": key, "category": ("warm", "matte")[i % 2],
                         "partition": partition})
    index = pd.DataFrame(rows)
    write_catalogue_index(store, index)
    return index


def refresh_config(store_uri: str, run_id: str, model: Path) -> RefreshConfig:
    return RefreshConfig(
        store_uri=store_uri, run_id=run_id, model_uri=str(model), gpu_work_pool="gpu",
        partition_deployment=PARTITIONS, partition_silence_s=SILENCE_S,
        learn=LearnParams(steps=2, min_pairs=2, route="lut", lut_size=9),
        apply=ApplyParams(num_inference_steps=2, batch_size=4), qc=LENIENT_QC,
        review=ReviewConfig(policy="auto_approve_passing", timeout_s=60, poll_interval_s=1),
    )


def start_refresh(config: RefreshConfig) -> UUID:
    """Start the refresh through the adhoc deployment, set to auto review by changing the deployment
    (a run cannot ask for auto review on a human-review deployment: flows/review.py)."""
    parameters = {"config": config.model_dump(mode="json")}
    with get_client(sync_client=True) as client:
        adhoc = client.read_deployment_by_name("catalogue-refresh/adhoc")
        client.update_deployment(adhoc.id, DeploymentUpdate(parameters=parameters))
    return run_deployment("catalogue-refresh/adhoc", parameters=parameters, timeout=0).id


def wait_final(cluster: Cluster, flow_run_id: UUID, timeout_s: float = STEP_TIMEOUT_S) -> FlowRun:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"{run.name} still {run.state_name}:\n{cluster.logs()}"
            time.sleep(2)


def partition_runs(run_id: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(PARTITIONS)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    return sorted((r for r in runs if r.parameters["pieces"][0]["job"]["run_id"] == run_id), key=lambda r: r.created)


def partitions_of(run: FlowRun) -> list[str]:
    return [piece["job"]["partition"] for piece in run.parameters["pieces"]]


def submitted_by(flow_run_ids: set[UUID], timeout_s: float = 60) -> dict[UUID, str]:
    """flow run id -> the worker that took it, from the workers' `submitted-flow-run` events (the
    server stores events asynchronously, so wait until every run has one)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(EventFilter(event=EventNameFilter(name=["prefect.worker.submitted-flow-run"])),
                                      limit=50)
            found = {UUID(r.id.removeprefix("prefect.flow-run.")): e.resource.name
                     for e in page.events for r in e.related if r.role == "flow-run"}
            if flow_run_ids <= set(found) or time.monotonic() > deadline:
                return {i: found.get(i) for i in flow_run_ids}
            time.sleep(2)


def heartbeats(flow_run_id: UUID) -> int:
    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                              resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=50)
    return len(page.events)


def unfinished_runs() -> list[str]:
    """Every flow run on the server left Pending, Running or Cancelling."""
    states = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))))
    return [f"{r.name} {r.state_name}" for r in runs]


@pytest.mark.timeout(2 * STEP_TIMEOUT_S + 600)
def test_partitions_run_as_flow_runs_on_both_gpu_workers(cluster: Cluster, tmp_path: Path) -> None:
    with get_client(sync_client=True) as client:
        pull = client.read_deployment_by_name(PARTITIONS).pull_steps
    assert DEPLOYING_MACHINE_HOME not in str(pull), "the deploying machine's checkout was stored"
    assert pull[-1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ worker-checkout.stdout }}"

    index = build_store(tmp_path / "shop", {"p0": (4, 40), "p1": (4, 40), "p2": (4, 40)})
    config = refresh_config(str(tmp_path / "shop"), "pool-e2e", cluster.model)
    parent = wait_final(cluster, start_refresh(config))

    assert parent.state.is_completed(), f"{parent.state_name}: {parent.state.message}\n{cluster.logs()}"
    children = partition_runs("pool-e2e")
    # Packed for the two online gpu workers: two runs, three partitions.
    assert len(children) == 2, [partitions_of(r) for r in children]
    assert sorted(p for r in children for p in partitions_of(r)) == ["p0", "p1", "p2"]
    assert all(r.state.is_completed() for r in children), [(r.name, r.state_name) for r in children]
    workers = submitted_by({r.id for r in children})
    assert set(workers.values()) == set(GPU_WORKERS), workers
    # The partition deployment's job variables switch heartbeats on in the runs' processes.
    assert all(heartbeats(r.id) >= 1 for r in children)

    manifest = assert_nothing_lost(open_store(config.store_uri), "pool-e2e", index)
    assert len(manifest) == len(index) == 12
    assert set(manifest["review_status"]) == {"approved"}, manifest["review_status"].value_counts()
    assert unfinished_runs() == []


@pytest.mark.timeout(2 * STEP_TIMEOUT_S + 600)
def test_a_gpu_worker_killed_mid_partition_is_detected_and_the_partition_sent_again(
        cluster: Cluster, tmp_path: Path) -> None:
    alive = [name for name in GPU_WORKERS if cluster.workers[name].poll() is None]
    assert len(alive) == 2, "both gpu workers must be up"
    # p2 is big enough to be caught between its first output and its completion marker.
    index = build_store(tmp_path / "shop", {"p0": (4, 40), "p1": (4, 40), "p2": (BIG, 160)})
    config = refresh_config(str(tmp_path / "shop"), "pool-kill", cluster.model)
    out = open_store(config.store_uri)
    parent_id = start_refresh(config)

    # 1. Wait until p2 has written an output and not its marker, then SIGKILL its worker's whole tree.
    outputs = tmp_path / "shop" / "edited" / "run=pool-kill"
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not list(outputs.glob("*/p2/*.png")):
        assert time.monotonic() < deadline, f"p2 never started:\n{cluster.logs()}"
        time.sleep(0.02)
    victim_run = next(r for r in partition_runs("pool-kill") if "p2" in partitions_of(r) and r.state.is_running())
    pid = int(str(victim_run.infrastructure_pid).rsplit(":", 1)[-1])
    victim = next(name for name in GPU_WORKERS if pid in {p.pid for p in process_tree(cluster.workers[name])})
    kill_tree(cluster.workers[victim])
    assert not out.exists(done_key("pool-kill", "p2")), "p2 finished before the kill; make it bigger"
    killed_at = time.monotonic()

    # 2. The parent notices the silence, marks the run Crashed and sends p2 to the other worker.
    parent = wait_final(cluster, parent_id)
    assert parent.state.is_completed(), f"{parent.state_name}: {parent.state.message}\n{cluster.logs()}"
    assert time.monotonic() - killed_at > SILENCE_S - 10, "the lost run was not waited for"
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(victim_run.id)
    assert crashed.state.is_crashed() and "its worker was lost" in crashed.state.message, crashed.state
    p2_runs = [r for r in partition_runs("pool-kill") if "p2" in partitions_of(r)]
    assert [r.state_name for r in p2_runs] == ["Crashed", "Completed"], [(r.name, r.state_name) for r in p2_runs]
    survivor = next(name for name in GPU_WORKERS if name != victim)
    assert submitted_by({p2_runs[1].id})[p2_runs[1].id] == survivor

    # 3. Nothing lost, nothing twice, nothing left running.
    manifest = assert_nothing_lost(out, "pool-kill", index)
    assert len(manifest) == len(index) == 8 + BIG
    assert set(manifest["review_status"]) == {"approved"}
    assert len(list(outputs.glob("*/p2/*.png"))) == BIG
    assert unfinished_runs() == []


def test_one_sigterm_stops_a_worker(cluster: Cluster) -> None:
    """deployments/README.md: one SIGTERM stops a worker started in the foreground; a worker whose
    SIGINT is ignored (started with `&` from a script without job control) does not stop on it."""
    folder, env = cluster.folder, cluster.env
    foreground = start_worker(folder, env, "gpu", "stop-fg", limit=1)
    with open(folder / "worker-stop-bg.log", "wb") as log:
        (folder / "cwd-stop-bg").mkdir()
        # What a shell does to a job started with `&` when job control is off.
        background = subprocess.Popen(
            ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *PREFECT, "worker", "start", "--pool", "gpu", "--name",
             "stop-bg"], cwd=folder / "cwd-stop-bg", env={**env, "PREFECT_HOME": str(folder / "home-stop-bg")},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for name in ("stop-fg", "stop-bg"):
            deadline = time.monotonic() + 120
            while "started" not in tail(folder / f"worker-{name}.log").lower():
                assert time.monotonic() < deadline, tail(folder / f"worker-{name}.log")
                time.sleep(1)
        os.kill(foreground.pid, signal.SIGTERM)
        os.kill(background.pid, signal.SIGTERM)
        assert foreground.wait(60) is not None
        time.sleep(10)
        assert background.poll() is None, "a worker ignoring SIGINT stopped on one SIGTERM: update the README"
    finally:
        kill_tree(foreground)
        kill_tree(background)
