"""Coarse, bounded fan-out: partitions larger than `shard_size` are edited in shards, merged into one
manifest file per partition; shards in flight are bounded by the thread pool (`workers`), and on the
pool path every dispatch call passes the one `DispatchGate`.

A local store, the LUT route and 40-pixel images: the refreshes take seconds and no model runs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect import flow
from prefect.states import Completed, Crashed

from flows import dispatch, refresh
from flows.learn import learn_instructions
from storage.manifest import read_manifest
from storage.run_layout import done_key, manifest_prefix, shard_key
from storage.store import open_store
from tasks import edit
from tasks.params import ApplyParams, LearnParams, PartitionJob, PartitionPiece, RefreshConfig, ReviewConfig
from tests.flows.reliability_helpers import LENIENT_QC, assert_nothing_lost, build_shop
from tests.tiny_models import build_tiny_ip2p

pytestmark = pytest.mark.usefixtures("prefect_harness")

PARTITIONS, PER_PARTITION, SHARD_SIZE = 3, 5, 2  # 3 shards per partition: 2 + 2 + 1 items


class Concurrency:
    """Counts how many calls of a wrapped function run at once, and when each started."""

    def __init__(self, hold_s: float = 0.0):
        self.hold_s, self.now, self.most, self.starts = hold_s, 0, 0, []
        self._lock = threading.Lock()

    def wrap(self, fn):
        def wrapper(*args, **kwargs):
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self.starts.append(time.monotonic())
            try:
                time.sleep(self.hold_s)
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1

        return wrapper


class FakeClient:
    """Stands in for Prefect's sync client (`with get_client(sync_client=True) as client`)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def config(store_uri: str, run_id: str, model: Path, **fields) -> RefreshConfig:
    return RefreshConfig(
        store_uri=store_uri, run_id=run_id, model_uri=str(model), workers=2, shard_size=SHARD_SIZE,
        learn=LearnParams(steps=2, min_pairs=2, route="lut", lut_size=9),
        apply=ApplyParams(num_inference_steps=2, batch_size=4), qc=LENIENT_QC,
        review=ReviewConfig(policy="auto_approve_passing", timeout_s=60, poll_interval_s=1), **fields)


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[str, Path, object]:
    root = tmp_path_factory.mktemp("shard-shop")
    index = build_shop(open_store(str(root / "shop")), partitions=PARTITIONS, per_partition=PER_PARTITION)
    return str(root / "shop"), build_tiny_ip2p(root / "tiny-ip2p"), index


def job(n: int) -> PartitionJob:
    items = [{"image_id": f"sku-{i:02d}", "key": f"k/{i}.png", "category": "warm"} for i in reversed(range(n))]
    return PartitionJob(store_uri="s", output_uri="o", run_id="r", partition="p0", items=items, instructions={})


def test_a_partition_is_cut_into_shards_of_at_most_shard_size_in_image_id_order():
    small = job(3)
    assert edit.cut_shards(small, 3) == [(small, None)]
    shards = edit.cut_shards(job(7), 3)
    assert [shard for _, shard in shards] == [0, 1, 2]
    assert [[i["image_id"] for i in j.items] for j, _ in shards] == [
        ["sku-00", "sku-01", "sku-02"], ["sku-03", "sku-04", "sku-05"], ["sku-06"]]
    assert all(j.partition == "p0" and j.run_id == "r" for j, _ in shards)


def pieces_of(sizes: list[int]) -> list[PartitionPiece]:
    return [PartitionPiece(job=job(n).model_copy(update={"partition": f"p{i}"})) for i, n in enumerate(sizes)]


def test_pieces_are_packed_into_runs_a_multiple_of_the_runners_within_max_items():
    pieces = pieces_of([100] * 50)
    packs = edit.pack_pieces(pieces, max_items=2500, runners=2)
    assert [sum(len(p.job.items) for p in pack) for pack in packs] == [2500, 2500]
    assert sorted(p.job.partition for pack in packs for p in pack) == sorted(p.job.partition for p in pieces)
    # 3 runs' worth of items on 2 runners: 4 runs, so neither worker does twice the other's work.
    assert [sum(len(p.job.items) for p in pack) for pack in edit.pack_pieces(pieces, 2000, 2)] == [1300, 1300, 1200, 1200]
    # Never more runs than pieces, and a lumpy night stays within one piece of even.
    assert len(edit.pack_pieces(pieces_of([4, 4, 4]), 500, 8)) == 3
    loads = [sum(len(p.job.items) for p in pack) for pack in edit.pack_pieces(pieces_of([48, 4, 4]), 500, 2)]
    assert loads == [48, 8]
    lumpy = edit.pack_pieces(pieces_of([300, 300, 300, 250, 150]), 500, 1)
    assert sorted(sum(len(p.job.items) for p in pack) for pack in lumpy) == [300, 300, 300, 400]


def test_a_pack_is_split_to_keep_its_run_parameters_under_the_api_limit():
    pieces = pieces_of([100] * 8)
    one = len(pieces[0].model_dump_json())
    packs = edit.pack_pieces(pieces, max_items=10_000, runners=1, max_bytes=3 * one)
    assert len(packs) == 3 and all(sum(len(p.model_dump_json()) for p in pack) <= 3 * one for pack in packs)
    with pytest.raises(ValueError, match=r"p0: 100 items make \d+ KB of flow-run parameters.*lower shard_size"):
        edit.pack_pieces(pieces, max_items=10_000, runners=1, max_bytes=one - 1)


def test_sharded_refresh_keeps_one_manifest_file_per_partition_and_bounds_shards_in_flight(shop, monkeypatch):
    store_uri, model, index = shop
    editing = Concurrency(hold_s=0.3)
    monkeypatch.setattr(edit, "edit_category", editing.wrap(edit.edit_category))
    summary = refresh.catalogue_refresh(config(store_uri, "sharded", model))

    out = open_store(store_uri)
    assert sorted(out.list(manifest_prefix("sharded") + "/")) == [
        f"{manifest_prefix('sharded')}/part-p{p}.parquet" for p in range(PARTITIONS)]
    manifest = assert_nothing_lost(out, "sharded", index)
    assert len(manifest) == PARTITIONS * PER_PARTITION
    assert set(manifest["method"]) == {"lut"}
    for p in range(PARTITIONS):
        assert json.loads(out.get_bytes(done_key("sharded", f"p{p}")))["items"] == PER_PARTITION
        assert [len(json.loads(out.get_bytes(shard_key("sharded", f"p{p}", s)))["rows"]) for s in range(3)] == [2, 2, 1]
    assert summary["partitions"] == {"total": PARTITIONS, "done": PARTITIONS, "skipped": 0}
    # The task results a resume takes back are JSON records in the output store.
    records = [json.loads(out.get_bytes(k)) for k in out.list("prefect-results/")]
    assert len(records) >= 1 + 1 + 9 + PARTITIONS  # ingest, learning, the shards, the merges (and the reports)
    # (A subflow's own result is stored bare, without its record: JSON too, and never read back.)
    assert {r["metadata"]["serializer"]["type"] for r in records if "metadata" in r} == {"json"}
    # 9 shards (one or two categories each), `workers=2` threads: never more than two at once.
    assert editing.most == 2


def test_a_rerun_redoes_only_the_unfinished_shard(shop, monkeypatch):
    store_uri, model, index = shop
    out = open_store(store_uri)
    refresh.catalogue_refresh(config(store_uri, "resharded", model))
    # A crash after shard 0 and 2 of p1 were written, before shard 1 and the merge.
    out.delete(done_key("resharded", "p1"))
    out.delete(shard_key("resharded", "p1", 1))
    edited = []
    real = edit.edit_category
    monkeypatch.setattr(edit, "edit_category", lambda job, category, items: edited.extend(
        i["image_id"] for i in items) or real(job, category, items))

    summary = refresh.catalogue_refresh(config(store_uri, "resharded", model))

    p1 = sorted(index[index["partition"] == "p1"]["image_id"])
    assert sorted(edited) == p1[2:4], "only shard 1 of p1 is edited again"
    assert summary["partitions"] == {"total": PARTITIONS, "done": 1, "skipped": PARTITIONS - 1}
    manifest = assert_nothing_lost(out, "resharded", index)
    assert len(manifest) == PARTITIONS * PER_PARTITION


def test_the_dispatch_gate_bounds_calls_at_once_and_per_second():
    gate = dispatch.DispatchGate(per_s=100, at_once=3)
    calls = Concurrency(hold_s=0.05)
    gated = calls.wrap(lambda: None)

    def caller():
        for _ in range(5):
            with gate.call():
                gated()

    threads = [threading.Thread(target=caller) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = sorted(calls.starts)
    assert len(starts) == 60
    assert calls.most == 3
    # Paced: 60 starts at 100/s span at least 0.59 s (less a late first wake-up).
    assert starts[-1] - starts[0] > 59 / 100 - 0.05


def test_every_dispatch_call_on_the_pool_path_goes_through_the_gate(shop, monkeypatch):
    """The pool path with the API faked: `run_deployment` edits the shard in place (a worker's job)
    and the run reads back Completed; 9 shards in flight at once make 18 calls through a 20/s gate, and
    the runs are created one at a time (two creations at once collide on a SQLite server's write lock)."""
    store_uri, model, index = shop
    cfg = config(store_uri, "pooled", model, gpu_work_pool="gpu", dispatch_calls_per_s=20)
    instructions = learn_instructions(cfg)
    jobs = [refresh.partition_job(cfg, "pooled", p, [dict(r) for r in rows.to_dict("records")], instructions)
            for p, rows in index.groupby("partition")]
    calls, creations = Concurrency(), Concurrency()
    shards_run = []

    def run_deployment(deployment, parameters, timeout, tags):
        assert deployment == "refresh-partition/gpu" and timeout == 0 and tags == ["run:pooled"]
        for piece in parameters["pieces"]:
            shards_run.append((piece["job"]["partition"], piece["shard"]))
            edit.edit_partition.fn(PartitionJob.model_validate(piece["job"]), piece["shard"])
        return SimpleNamespace(id=uuid4(), name="fake")

    class Client(FakeClient):
        def read_flow_run(self, flow_run_id):
            return SimpleNamespace(state=Completed(), name="fake", state_name="Completed")

    monkeypatch.setattr(dispatch, "run_deployment", calls.wrap(creations.wrap(run_deployment)))
    monkeypatch.setattr(dispatch, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(Client, "read_flow_run", calls.wrap(Client.read_flow_run))
    monkeypatch.setattr(refresh, "check_partition_deployment", lambda deployment, pool: None)

    started = time.monotonic()
    summaries = flow(name="pool-dispatch")(refresh.edit_partitions)(jobs, cfg.model_copy(update={"pool_in_flight": 9}))

    assert sorted(shards_run) == [(f"p{p}", s) for p in range(PARTITIONS) for s in range(3)]
    assert [s["items"] for s in summaries] == [PER_PARTITION] * PARTITIONS
    starts = sorted(calls.starts)
    assert len(starts) == 18
    assert starts[-1] - starts[0] > 17 / 20 - 0.05
    assert time.monotonic() - started > 17 / 20
    assert calls.most <= dispatch.API_AT_ONCE
    assert creations.most == 1
    manifest = read_manifest(open_store(store_uri), "pooled")
    assert sorted(manifest["image_id"]) == sorted(index["image_id"])


def test_on_the_pool_small_partitions_share_a_run_and_a_crashed_run_resends_only_unfinished_pieces(shop, monkeypatch):
    """The pool path with the API faked, 2 runners and 3 partitions of 5 items (shard_size 10, so no
    cuts): 2 runs, one with two partitions. That run finishes its first piece, then its worker is
    lost (Crashed): the run sent again carries only the unfinished piece."""
    store_uri, model, index = shop
    cfg = config(store_uri, "packed", model, gpu_work_pool="gpu", pool_in_flight=2).model_copy(update={"shard_size": 10})
    instructions = learn_instructions(cfg)
    jobs = [refresh.partition_job(cfg, "packed", p, [dict(r) for r in rows.to_dict("records")], instructions)
            for p, rows in index.groupby("partition")]
    runs, states = [], {}

    def run_deployment(deployment, parameters, timeout, tags):
        pieces = [PartitionPiece.model_validate(piece) for piece in parameters["pieces"]]
        runs.append([piece.label for piece in pieces])
        crash = len(pieces) > 1 and not any(len(r) == 1 and r[0] == pieces[-1].label for r in runs[:-1])
        for piece in pieces[:1] if crash else pieces:
            edit.edit_partition.fn(piece.job, piece.shard)
        run_id = uuid4()
        states[run_id] = Crashed(message="worker lost") if crash else Completed()
        return SimpleNamespace(id=run_id, name=f"run-{run_id}")

    class Client(FakeClient):
        def read_flow_run(self, flow_run_id):
            state = states[flow_run_id]
            return SimpleNamespace(state=state, name=f"run-{flow_run_id}", state_name=state.name)

    monkeypatch.setattr(dispatch, "run_deployment", run_deployment)
    monkeypatch.setattr(dispatch, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(refresh, "check_partition_deployment", lambda deployment, pool: None)

    summaries = flow(name="pool-packs")(refresh.edit_partitions)(jobs, cfg)

    two = next(r for r in runs if len(r) == 2)
    assert sorted(map(sorted, runs)) == sorted([sorted(two), [l for l in ("p0", "p1", "p2") if l not in two], [two[1]]])
    assert [s["partition"] for s in summaries] == ["p0", "p1", "p2"]
    assert [s["items"] for s in summaries] == [PER_PARTITION] * PARTITIONS
    manifest = read_manifest(open_store(store_uri), "packed")
    assert sorted(manifest["image_id"]) == sorted(index["image_id"]), "an item lost or written twice"


def test_the_runners_a_night_is_packed_for_come_from_config_then_pool_limit_then_online_workers(monkeypatch):
    pool = SimpleNamespace(concurrency_limit=None)
    workers = [SimpleNamespace(name=f"w{i}", status=SimpleNamespace(value=v))
               for i, v in enumerate(("ONLINE", "OFFLINE", "ONLINE", "ONLINE"))]

    class Client(FakeClient):
        def read_work_pool(self, name):
            assert name == "gpu"
            return pool

        def read_workers_for_work_pool(self, name):
            return workers

    monkeypatch.setattr(dispatch, "get_client", lambda sync_client: Client())
    cfg = RefreshConfig(store_uri="s", gpu_work_pool="gpu")
    assert dispatch.pool_runners(cfg) == 3
    pool.concurrency_limit = 5
    assert dispatch.pool_runners(cfg) == 5
    assert dispatch.pool_runners(cfg.model_copy(update={"pool_in_flight": 7})) == 7
    pool.concurrency_limit, workers[:] = None, []
    assert dispatch.pool_runners(cfg) == 1
