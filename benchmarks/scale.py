"""What orchestration costs at catalogue scale: one synthetic catalogue on SeaweedFS (S3 on loopback),
the LUT route (so compute is cheap and overhead shows), edited three ways against one real `prefect
server start`: in this process with threads (`workers` 2, the baseline), then on the `gpu` work pool
with 1 and with 2 `prefect worker start --limit 1` workers (each single-threaded).

Per path: wall time of the edit stage and the sum of in-task compute (the partitions' own
`duration_s`), orchestration overhead = (wall - compute / parallelism) / wall, dispatch latency per
pool run (Pending -> Running: process start, pull step, imports; and the wait in the pool's queue
before it; a pool run carries a pack of partitions of at most `--shard-size` items), Prefect API calls per item (the server's access log: every process, workers'
polls included), and the edit stage's task runs recorded by the server against those executed. Ratios
against the threads baseline and the 1-worker pool run of the same invocation, and the issue-16 targets.

Run (alone on the machine for real figures):
    nice -n 10 .venv/bin/python -m benchmarks.scale [--items 5000] [--partitions 50] [--side 64]
        [--shard-size 500] [--worker-query-s 2] [--paths threads,pool1,pool2] [--database sqlite|postgres]
"""

from __future__ import annotations

import os
import tempfile

# Prefect reads its home at import time: never the developer's own ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="retouch-scale-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import argparse
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.dispatch import MAX_RUN_PARAMETER_BYTES
from flows.refresh import catalogue_refresh
from storage.layout import write_catalogue_index
from storage.run_layout import done_key
from storage.store import open_store
from tasks.edit import cut_shards, pack_pieces
from tasks.params import (
    ApplyParams,
    LearnParams,
    PartitionJob,
    PartitionPiece,
    QCConfig,
    RefreshConfig,
    ReviewConfig,
)
from tests.deployments.server import PREFECT, ROOT, free_port, running_server, wait_workers_online

BUCKET = "scale"
CATEGORIES = ("warm", "matte")
ACCESS = re.compile(rb'"(GET|POST|PATCH|PUT|DELETE) /api/')
EDIT_TASKS = ("edit_partition", "edit_partition_on_pool", "merge_shards")
TARGETS = {"threads": 0.05, "pool": 0.10, "speedup": 1.7}
# No flag ever stops an edit here: what is measured is the orchestration, not the edit's quality.
OPEN_QC = QCConfig(fail_ssim_structure=0, flag_ssim_structure=0, flag_direction_agreement=-1, flag_strength_min=0,
                   flag_strength_max=100, flag_clipped_fraction=1, fail_clipped_fraction=1, fail_output_std=0,
                   flag_deltae2000_mean=100, fail_deltae2000_mean=100, flag_deltae2000_p95=100,
                   fail_deltae2000_p95=100)


# ---- the store ----


@contextmanager
def seaweedfs(folder: Path) -> Iterator[str]:
    """`weed mini` on loopback with one SigV4 identity; the AWS_* environment points at it."""
    key, secret = "scale-bench", "scale-bench-secret"
    (folder / "s3.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (folder / "weed").mkdir()
    ports = []
    while len(ports) < 4:  # weed also binds port + 10000 for gRPC: keep below 55535
        port = free_port()
        if port < 55535 and port not in ports:
            ports.append(port)
    master, volume, filer, s3 = ports
    with open(folder / "weed.log", "wb") as log:
        weed = subprocess.Popen(
            [str(Path(sys.executable).parent / "weed"), "mini", f"-dir={folder / 'weed'}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", f"-s3.config={folder / 's3.json'}", f"-master.port={master}",
             f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}", "-webdav=false",
             "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    os.environ.update({"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials")})
    try:
        import boto3

        deadline = time.monotonic() + 120
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:  # the filer may need a moment
                if weed.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield f"s3://{BUCKET}/shop"
    finally:
        weed.terminate()
        try:
            weed.wait(15)
        except subprocess.TimeoutExpired:
            weed.kill()
            weed.wait()


def png(seed: int, side: int, warm: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.asarray(Image.fromarray(rng.integers(40, 200, (4, 4, 3)).astype(np.uint8)).resize((side, side)))
    if warm:
        image = (image.astype(np.int16) + np.array([25, 5, -20])).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def build_store(store_uri: str, items: int, partitions: int, side: int) -> pd.DataFrame:
    store = open_store(store_uri)
    for c, category in enumerate(CATEGORIES):
        for p in range(3):
            store.put_bytes(f"exemplars/{category}/pair-{p}/before.png", png(1000 + 10 * c + p, side))
            store.put_bytes(f"exemplars/{category}/pair-{p}/after.png", png(1000 + 10 * c + p, side, warm=True))
    rows = [{"image_id": f"sku-{i:05d}", "key": f"catalogue/images/sku-{i:05d}.png",
             "category": CATEGORIES[i % 2], "partition": f"p{i % partitions:03d}"} for i in range(items)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: store.put_bytes(rows[n]["key"], png(n, side)), range(items)))
    index = pd.DataFrame(rows)
    write_catalogue_index(store, index)
    return index


# ---- Prefect: pools, deployments, workers ----


def prepare_pools(env: dict[str, str], folder: Path) -> None:
    for pool in ("cpu", "gpu"):
        subprocess.run([*PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=300)
    subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                   cwd=ROOT, env={**env, "RETOUCH_HOME": str(ROOT), "RETOUCH_STORE_URI": str(folder / "no-store")},
                   check=True, capture_output=True, timeout=900)
    with get_client(sync_client=True) as client:
        for name in ("catalogue-refresh/nightly", "expire-reviews/hourly"):
            deployment = client.read_deployment_by_name(name)
            client.pause_deployment(deployment.id)
            for run in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))):
                client.delete_flow_run(run.id)


@contextmanager
def gpu_workers(folder: Path, env: dict[str, str], count: int, query_s: float) -> Iterator[None]:
    """`count` workers on the gpu pool, one flow run at a time each, every one with its own home,
    polling the pool every `query_s` seconds (deployments/README.md recommends 2; Prefect's default 10).
    The pool's concurrency limit is set to `count`, as the guide says, so the refresh packs the night
    for these workers and not for the previous path's, which the server still shows online for a while."""
    subprocess.run([*PREFECT, "work-pool", "set-concurrency-limit", "gpu", str(count)], env=env, check=True,
                   capture_output=True, timeout=300)
    procs = []
    for n in range(count):
        name = f"gpu-{count}-{n}"
        (folder / f"cwd-{name}").mkdir()
        with open(folder / f"worker-{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"],
                cwd=folder / f"cwd-{name}", env={**env, "PREFECT_HOME": str(folder / f"home-{name}"),
                                                 "RETOUCH_HOME": str(ROOT),
                                                 "PREFECT_WORKER_QUERY_SECONDS": str(query_s)},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        # A night's workers are up before it starts: waiting here keeps their own start-up (5-10 s of
        # imports) out of the runs' queue wait.
        wait_workers_online("gpu", [f"gpu-{count}-{n}" for n in range(count)])
        yield
    finally:
        for proc in procs:
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(30)


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback (the `initdb`/`pg_ctl` of the machine's PostgreSQL),
    for the server the README recommends; yields Prefect's connection URL. PostgreSQL refuses to run
    as root, so under root the cluster belongs to `nobody`."""
    for tool in ("initdb", "pg_ctl", "psql"):
        if shutil.which(tool) is None:
            raise SystemExit(f"--database postgres needs PostgreSQL's {tool} on PATH (the postgresql package)")
    folder = Path(tempfile.mkdtemp(prefix="retouch-scale-pg-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "nobody")
    port = free_port()
    data = folder / "data"
    subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "prefect", "--auth=trust"], check=True,
                   capture_output=True, cwd=folder)
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True, cwd=folder)
    try:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "postgres", "-c",
                        "CREATE DATABASE prefect"], check=True, capture_output=True)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-w", "-m", "fast", "stop"], check=False, capture_output=True,
                       cwd=folder)
        shutil.rmtree(data, ignore_errors=True)  # postgres.log stays, beside the work folder


# ---- one measured path ----


def config(store_uri: str, run_id: str, pool: bool, shard_size: int) -> RefreshConfig:
    return RefreshConfig(
        store_uri=store_uri, run_id=run_id, workers=2, shard_size=shard_size,
        gpu_work_pool="gpu" if pool else None, partition_silence_s=600,
        learn=LearnParams(steps=2, min_pairs=2, route="lut", lut_size=17, light_field=False),
        apply=ApplyParams(batch_size=8), qc=OPEN_QC,
        review=ReviewConfig(policy="auto_approve_passing", timeout_s=60, poll_interval_s=1))


def flow_run_ids(tag: str) -> list:
    ids, offset = [], 0
    with get_client(sync_client=True) as client:
        while page := client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
                                            limit=200, offset=offset):
            ids += [r.id for r in page]
            offset += len(page)
    return ids


def recorded_task_runs(flow_runs: list) -> dict[str, int]:
    """Edit-stage task runs the server holds for these flow runs, by task name; waits until stable
    (the server records task runs from events, asynchronously)."""
    def count() -> dict[str, int]:
        found = dict.fromkeys(EDIT_TASKS, 0)
        with get_client(sync_client=True) as client:
            for start in range(0, len(flow_runs), 100):
                offset = 0
                flt = FlowRunFilter(id=FlowRunFilterId(any_=flow_runs[start:start + 100]))
                while page := client.read_task_runs(flow_run_filter=flt, limit=200, offset=offset):
                    for run in page:
                        name = run.name.rsplit("-", 1)[0]
                        if name in found and run.state is not None and run.state.is_completed():
                            found[name] += 1
                    offset += len(page)
        return found

    last, deadline = None, time.monotonic() + 120
    while (now := count()) != last and time.monotonic() < deadline:
        last = now
        time.sleep(5)
    return now


def dispatch_latencies(run_id: str) -> tuple[list[float], list[float]]:
    """Per run on the pool: (queue wait: created -> Pending, start: Pending -> Running)."""
    queue, start = [], []
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids(f"run:{run_id}"):
            run = client.read_flow_run(flow_run_id)
            if run.deployment_id is None:
                continue
            times = {s.type.value: s.timestamp for s in client.read_flow_run_states(flow_run_id)}
            if "PENDING" in times and "RUNNING" in times:
                queue.append((times["PENDING"] - run.created).total_seconds())
                start.append((times["RUNNING"] - times["PENDING"]).total_seconds())
    return queue, start


def timeline(parent_run, run_id: str, compute_s: float) -> dict[str, float]:
    """Where a pool path's wall time goes, from the server's timestamps: per pool run (median over
    runs) the refresh creating it (its `edit_partition_on_pool` task start -> the run created), the
    queue (-> Pending), the start (-> Running: the process, Prefect, the pull step and the flow's
    imports, since Prefect 3 loads the flow before it reports Running), the run's own setup (-> its
    first piece starts), the tail (last piece ends -> the run Completed) and the refresh noticing it
    (-> its task ends); and over all runs, the time between pieces and the time inside piece task
    runs outside the partitions' timed windows. Parent tasks and runs are paired in creation order."""
    segments: dict[str, list[float]] = {k: [] for k in ("create", "queue", "start", "setup", "tail", "notice")}
    between = inside = 0.0
    with get_client(sync_client=True) as client:
        parents = sorted((t for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_run])), limit=200)
            if t.name.startswith("edit_partition_on_pool") and t.start_time), key=lambda t: t.start_time)
        children = sorted((client.read_flow_run(i) for i in flow_run_ids(f"run:{run_id}")), key=lambda r: r.created)
        children = [c for c in children if c.deployment_id is not None]
        # Each parent task creates one child run (a pack sent again after a lost worker adds one more).
        for task, child in zip(parents, children, strict=False):
            times = {st.type.value: st.timestamp for st in client.read_flow_run_states(child.id)}
            pieces = sorted((t for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])), limit=200)
                if t.name.startswith("edit_partition") and t.start_time and t.end_time), key=lambda t: t.start_time)
            if not pieces or not {"PENDING", "RUNNING", "COMPLETED"} <= set(times):
                continue
            segments["create"].append((child.created - task.start_time).total_seconds())
            segments["queue"].append((times["PENDING"] - child.created).total_seconds())
            segments["start"].append((times["RUNNING"] - times["PENDING"]).total_seconds())
            segments["setup"].append((pieces[0].start_time - times["RUNNING"]).total_seconds())
            segments["tail"].append((times["COMPLETED"] - pieces[-1].end_time).total_seconds())
            if task.end_time:
                segments["notice"].append((task.end_time - times["COMPLETED"]).total_seconds())
            durations = sum((t.end_time - t.start_time).total_seconds() for t in pieces)
            between += (pieces[-1].end_time - pieces[0].start_time).total_seconds() - durations
            inside += durations
    out = {k: statistics.median(v) for k, v in segments.items() if v}
    out["between_pieces_total"] = between
    out["inside_pieces_outside_windows_total"] = inside - compute_s
    return out


def measure(label: str, cfg: RefreshConfig, index: pd.DataFrame, parallelism: int, server_log: Path) -> dict:
    log_from = server_log.stat().st_size
    # Found by its id, not by a tag: a tag on the flow would land on every task run, and Prefect makes
    # one tag-concurrency API call per tagged task run start, which the product's runs never make.
    state = catalogue_refresh(cfg, return_state=True)
    summary = state.result()
    calls = len(ACCESS.findall(server_log.read_bytes()[log_from:]))
    out = open_store(cfg.output_uri)
    partitions = sorted(index["partition"].unique())
    compute = sum(json.loads(out.get_bytes(done_key(cfg.run_id, p)))["duration_s"] for p in partitions)
    wall = summary["timings_s"]["edit"]
    jobs = [PartitionJob(store_uri="-", output_uri="-", run_id="-", partition=p, items=rows.to_dict("records"),
                         instructions={}) for p, rows in index.groupby("partition")]
    pieces = [piece for job in jobs for piece in cut_shards(job, cfg.shard_size)]
    # The product packs the pieces for the pool's online workers (`parallelism` of them here).
    packs = pack_pieces([PartitionPiece(job=job, shard=shard) for job, shard in pieces], cfg.shard_size,
                        parallelism, max_bytes=MAX_RUN_PARAMETER_BYTES) if cfg.gpu_work_pool else []
    executed = {"edit_partition": len(pieces), "merge_shards": sum(s == 0 for _, s in pieces),
                "edit_partition_on_pool": len(packs)}
    runs = [state.state_details.flow_run_id] + (flow_run_ids(f"run:{cfg.run_id}") if cfg.gpu_work_pool else [])
    recorded = recorded_task_runs(runs)
    queue, start = dispatch_latencies(cfg.run_id) if cfg.gpu_work_pool else ([], [])
    spent = timeline(state.state_details.flow_run_id, cfg.run_id, compute) if cfg.gpu_work_pool else {}
    result = {"path": label, "wall_s": wall, "compute_s": compute, "parallelism": parallelism,
              "overhead": (wall - compute / parallelism) / wall, "items": len(index),
              "api_calls_per_item": calls / len(index), "executed": executed, "recorded": recorded,
              "lost": sum(max(0, executed[n] - recorded[n]) for n in EDIT_TASKS),
              "queue_wait_s": queue, "start_s": start, "total_s": summary["timings_s"]["total"],
              "timeline_s": {k: round(v, 2) for k, v in spent.items()}}
    print(json.dumps({k: v for k, v in result.items() if k not in ("queue_wait_s", "start_s")}), flush=True)
    return result


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def report(results: list[dict]) -> None:
    base = results[0]
    one = next((r for r in results if r["path"] == "pool x1"), None)
    print("\n| path | edit wall s | in-task compute s | parallelism | overhead | wall vs threads | "
          "queue wait s (median / max) | start s (median / max) | API calls / item | task runs recorded / executed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        executed, recorded = sum(r["executed"].values()), sum(r["recorded"].values())
        print(f"| {r['path']} | {r['wall_s']:.1f} | {r['compute_s']:.1f} | {r['parallelism']} | "
              f"{100 * r['overhead']:.1f} % | {r['wall_s'] / base['wall_s']:.2f}x | {spread(r['queue_wait_s'])} | "
              f"{spread(r['start_s'])} | {r['api_calls_per_item']:.2f} | {recorded} / {executed} |")
    for r in results:
        if spent := r.get("timeline_s"):
            per_run = ", ".join(f"{k} {spent[k]:.1f}" for k in ("create", "queue", "start", "setup", "tail", "notice")
                                if k in spent)
            print(f"{r['path']}: per pool run (median s) {per_run}; over all runs {spent['between_pieces_total']:.1f} s "
                  f"between pieces, {spent['inside_pieces_outside_windows_total']:.1f} s inside pieces outside "
                  "their timed windows")
    print("\ntargets:")
    for r in results:
        target = TARGETS["threads"] if r["path"] == "threads" else TARGETS["pool"]
        print(f"  {r['path']}: overhead {100 * r['overhead']:.1f} % < {100 * target:.0f} %: "
              f"{'met' if r['overhead'] < target else 'MISSED'}; task runs lost {r['lost']}: "
              f"{'met' if r['lost'] == 0 else 'MISSED'}")
    two = next((r for r in results if r["path"] == "pool x2"), None)
    if one and two:
        speedup = one["wall_s"] / two["wall_s"]
        print(f"  pool x2 vs pool x1: {speedup:.2f}x >= {TARGETS['speedup']}x: "
              f"{'met' if speedup >= TARGETS['speedup'] else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=50)
    parser.add_argument("--side", type=int, default=64, help="pixels per side of each catalogue image")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--paths", default="threads,pool1,pool2", help="any of threads, pool1, pool2")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="the Prefect server's database: SQLite (Prefect's default) or a throwaway PostgreSQL "
                        "cluster (what the README recommends for production)")
    parser.add_argument("--worker-query-s", type=float, default=2,
                        help="the gpu workers' PREFECT_WORKER_QUERY_SECONDS (Prefect's default is 10)")
    args = parser.parse_args()
    paths = args.paths.split(",")
    folder = Path(tempfile.mkdtemp(prefix="retouch-scale-"))
    print(f"{args.items} items in {args.partitions} partitions, {args.side}px, shard_size {args.shard_size}, "
          f"workers poll every {args.worker_query_s:g} s, Prefect server on {args.database}; "
          f"work folder {folder}", flush=True)
    with seaweedfs(folder) as store_uri:
        started = time.monotonic()
        index = build_store(store_uri, args.items, args.partitions, args.side)
        print(f"store built in {time.monotonic() - started:.0f} s", flush=True)
        with ExitStack() as stack:
            database = {}
            if args.database == "postgres":
                database["PREFECT_API_DATABASE_CONNECTION_URL"] = stack.enter_context(postgres())
            url, env = stack.enter_context(running_server(folder, PREFECT_SERVER_LOGGING_LEVEL="INFO", **database))
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
            prepare_pools(env, folder)
            results = []
            if "threads" in paths:
                results.append(measure("threads", config(store_uri, "scale-threads", False, args.shard_size),
                                       index, 2, folder / "server.log"))
            for count in (1, 2):
                if f"pool{count}" in paths:
                    with gpu_workers(folder, env, count, args.worker_query_s):
                        results.append(measure(f"pool x{count}",
                                               config(store_uri, f"scale-pool{count}", True, args.shard_size),
                                               index, count, folder / "server.log"))
    report(results)


if __name__ == "__main__":
    try:
        main()
    except urllib.error.URLError as exc:  # the server went away
        raise SystemExit(f"Prefect server unreachable: {exc}") from exc
