"""Nothing is lost or duplicated: a worker killed while editing or while publishing, S3 faults, bad
inputs, tampered instructions.

Real SeaweedFS S3 on loopback, a real Prefect API (the test harness), tiny random models.
Review-path guarantees (reject and timeout publish nothing, anonymous approval refused) are in
tests/flows/test_review.py and tests/cli/test_review_cli.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
from prefect.logging import disable_run_logger
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from cli.main import app
from cli.review import ReviewCliError, find_paused_flow_run
from editing.instruct import InstructionIntegrityError, InstructionModelMismatch, load_instruction
from editing.instruct.artifact import _content_hash
from editing.models import load_model
from flows.refresh import catalogue_refresh
from storage.keys import InvalidKeyError
from storage.manifest import read_manifest
from storage.run_layout import done_key, key_for_uri, lease_key
from storage.store import open_store
from tasks.decisions import recorded_decisions
from tasks.edit import edit_category
from tasks.ingest import catalogue_partitions, validate_exemplars
from tasks.lease import LEASE_TTL_ENV
from tasks.params import PartitionJob, ReviewConfig
from tasks.signing import SIGNING_KEY_ENV
from tests.flows.reliability_helpers import (
    add_bad_inputs,
    assert_nothing_lost,
    build_shop,
    refresh_config,
)
from tests.storage.conftest import FaultPlan, FaultProxy
from tests.tiny_models import build_tiny_ip2p

ROOT = Path(__file__).resolve().parents[2]
# Whole refreshes, each tens of seconds on 2 cores: marked slow, still run in CI.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p"))


def _edited_outputs(store, run_id: str) -> list[str]:
    return [
        k for k in store.list(f"edited/run={run_id}/") if k.endswith(".png") and "/contact-sheets/" not in k
    ]


@pytest.fixture
def short_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed flow run cannot release its run id; a short time to live keeps the re-run waiting briefly.
    Set before the driver's environment is copied, so both processes agree; signing likewise."""
    monkeypatch.setenv(LEASE_TTL_ENV, "4")
    monkeypatch.setenv(SIGNING_KEY_ENV, "reliability-signing-key-" + "5" * 32)


def _wait_for_lease_to_lapse(store, run_id: str) -> None:
    """What an operator re-running a crashed run id sees: refused until the dead run's lease lapses."""
    lease = json.loads(store.get_bytes(lease_key(run_id)))
    time.sleep(max(0.0, (pd.Timestamp(lease["expires_at"]) - pd.Timestamp.now(tz="UTC")).total_seconds()) + 0.5)


def _kill_when(
    proc: subprocess.Popen, ready: Callable[[], object], what: str, deadline: float, log: Path
) -> None:
    """SIGKILL the flow process as soon as `ready()` is truthy; fail if it exits or times out first."""
    while not ready():
        assert proc.poll() is None, f"the flow process ended before {what}; see {log}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}; see {log}"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)


def test_worker_killed_mid_partition_then_rerun_loses_and_duplicates_nothing(
    prefect_harness, s3_uri, tiny_model, tmp_path, short_leases
) -> None:
    store = open_store(s3_uri)
    index = build_shop(store, partitions=3, per_partition=4)
    config = refresh_config(s3_uri, "kill-1", tiny_model)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.flows.reliability_driver", config.model_dump_json(), "2.0"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Generous: on a shared 2-core box the child's imports and instruction learning can crawl.
        deadline = time.monotonic() + 900
        _kill_when(proc, lambda: _edited_outputs(store, "kill-1"), "writing any output", deadline, log)
    finally:
        proc.kill()
        proc.wait()
    written = _edited_outputs(store, "kill-1")
    partition = written[0].split("/")[3]
    # Killed in the middle of a partition: outputs exist, its marker and manifest file do not.
    assert not store.exists(done_key("kill-1", partition))
    assert not list(store.list(f"manifest/run=kill-1/part-{partition}"))
    _wait_for_lease_to_lapse(store, "kill-1")

    summary = catalogue_refresh(config)

    manifest = assert_nothing_lost(store, "kill-1", index)
    assert len(_edited_outputs(store, "kill-1")) == len(index)  # rewritten into the same keys
    assert set(manifest["review_status"]) <= {"approved", "rejected"}
    assert summary["review"]["outcome"] == "decided"
    # A second complete run of the same run id publishes nothing new and changes no verdict.
    again = catalogue_refresh(config)
    assert again["review"]["outcome"] == "nothing_pending"
    pd.testing.assert_frame_equal(
        assert_nothing_lost(store, "kill-1", index).sort_values("image_id").reset_index(drop=True),
        manifest.sort_values("image_id").reset_index(drop=True),
    )


def _start_driver(config, slow_s: float, prefix: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.flows.reliability_driver",
                config.model_dump_json(),
                str(slow_s),
                prefix,
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_killed_while_publishing_then_rerun_publishes_every_approved_item_exactly_once(
    prefect_harness, s3_uri, tiny_model, tmp_path, short_leases
) -> None:
    store = open_store(s3_uri)
    index = build_shop(store, partitions=3, per_partition=4)
    # Human review; a broken replay would pause the re-run until this deadline and then expire.
    config = refresh_config(s3_uri, "pubkill-1", tiny_model).model_copy(
        update={"review": ReviewConfig(policy="human", timeout_s=240, poll_interval_s=1)}
    )
    log = tmp_path / "driver.log"
    proc = _start_driver(config, 2.0, "published/", log)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, f"the flow process ended before the review; see {log}"
            assert time.monotonic() < deadline, f"the run never paused for review; see {log}"
            try:
                find_paused_flow_run("pubkill-1")
                break
            except ReviewCliError:
                time.sleep(0.3)
        approve = CliRunner().invoke(
            app, ["review", "approve", "pubkill-1", "--all-passing", "--reviewer", "alice"]
        )
        assert approve.exit_code == 0, approve.output
        assert "12 to approve, 0 to reject" in approve.output
        _kill_when(proc, lambda: list(store.list("published/")), "publishing anything", deadline, log)
    finally:
        proc.kill()
        proc.wait()
    published_at_kill = {k: store.get_bytes(k) for k in store.list("published/")}
    at_kill = read_manifest(store, "pubkill-1").set_index("image_id")
    # Killed in the crash window: objects copied, their rows not yet recorded.
    assert 0 < len(published_at_kill) < len(index)
    for key in published_at_kill:
        assert at_kill.loc[key.rsplit("/", 1)[1].removesuffix(".png"), "review_status"] == "pending", key
    [record], refused = recorded_decisions(s3_uri, "pubkill-1")
    assert record["decision"]["reviewer"] == "alice" and refused == []
    _wait_for_lease_to_lapse(store, "pubkill-1")

    summary = catalogue_refresh(config)

    review = summary["review"]
    assert review["outcome"] == "decided" and review["reviewers"] == ["alice"]
    pending_at_kill = int((at_kill["review_status"] == "pending").sum())
    # The objects copied before the kill were found identical, the rest created; nothing replaced.
    assert review["published"] == {
        "created": pending_at_kill - len(published_at_kill),
        "unchanged": len(published_at_kill),
        "replaced": 0,
        "superseded": 0,
        "unpublished": 0,
    }
    manifest = assert_nothing_lost(store, "pubkill-1", index).set_index("image_id")
    assert set(manifest["review_status"]) == {"approved"} and set(manifest["reviewer"]) == {"alice"}
    # Every row carries the time of the one decision, whichever process recorded it.
    assert set(manifest["reviewed_at"]) == {pd.Timestamp(record["decided_at"])}
    for image_id, row in manifest.iterrows():
        assert row["published_uri"] == store.uri_for(f"published/{row['category']}/{image_id}.png")
        assert store.get_bytes(key_for_uri(store, row["published_uri"])) == store.get_bytes(
            key_for_uri(store, row["output_uri"])
        ), image_id
    assert all(store.get_bytes(k) == data for k, data in published_at_kill.items())


def test_s3_throttling_and_5xx_on_reads_and_writes_are_retried_and_the_run_completes(
    prefect_harness, seaweed_s3, s3_uri, tiny_model, monkeypatch
) -> None:
    index = build_shop(open_store(s3_uri), partitions=2, per_partition=3)
    proxy = FaultProxy(seaweed_s3.endpoint_url, FaultPlan(status=503, code="SlowDown", fraction=0.15, seed=3))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        summary = catalogue_refresh(refresh_config(s3_uri, "faults-1", tiny_model))
        throttled = proxy.plan.faults
        proxy.plan = FaultPlan(status=500, code="InternalError", fraction=0.15, seed=4)
        assert catalogue_refresh(refresh_config(s3_uri, "faults-1", tiny_model))["review"]["outcome"] == (
            "nothing_pending"
        )
        failed = proxy.plan.faults
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed_s3.endpoint_url)
    assert throttled >= 10 and failed >= 3, (throttled, failed)
    assert summary["review"]["outcome"] == "decided"
    manifest = assert_nothing_lost(open_store(s3_uri), "faults-1", index)
    assert (manifest["qc_status"] != "error").all()


def test_bad_inputs_become_error_rows_naming_the_reason_and_the_rest_completes(
    prefect_harness, tmp_path, tiny_model
) -> None:
    store = open_store(str(tmp_path / "store"))
    index, expected = add_bad_inputs(store, build_shop(store, partitions=2, per_partition=3))

    summary = catalogue_refresh(refresh_config(store.uri, "bad-1", tiny_model))

    manifest = assert_nothing_lost(store, "bad-1", index).set_index("image_id")
    for image_id, code in expected.items():
        row = manifest.loc[image_id]
        if code is None:  # CMYK and 16-bit decode to RGB and are edited like any other item
            assert row["qc_status"] != "error" and isinstance(row["output_uri"], str), image_id
        else:
            assert (row["qc_status"], row["error_code"]) == ("error", code), image_id
            assert row["error"], image_id
            assert pd.isna(row["output_uri"]) and row["review_status"] == "rejected"
    good = manifest.drop(index=list(expected))
    assert (good["qc_status"] != "error").all() and good["output_uri"].notna().all()
    assert set(summary["categories"]) == {"warm", "matte"}
    # Exemplar problems are reported and left out; the good pairs still teach the category.
    with disable_run_logger():
        reports = [validate_exemplars.fn(store.uri, c) for c in ("warm", "matte")]
    problems = {p["code"] for report in reports for p in report["problems"]}
    assert {"pair_size_mismatch", "missing_pair_half", "unexpected_key"} <= problems
    assert all(
        summary["categories"][c]["instruction"].startswith(("learned", "reused")) for c in ("warm", "matte")
    )

    _assert_tampered_instructions_refused(store, tiny_model, tmp_path)


def _assert_tampered_instructions_refused(store, tiny_model: str, tmp_path: Path) -> None:
    """A learned instruction loads only on the model it was learned on, only byte-exact, and, even
    with its content hash recomputed by whoever changed it, only with the tensors the model takes."""
    weights_key = next(k for k in store.list("instructions/") if k.endswith(".safetensors"))
    data = store.get_bytes(weights_key)
    metadata = json.loads(store.get_bytes(weights_key.removesuffix(".safetensors") + ".json"))
    model = load_model(tiny_model)
    assert load_instruction(data, metadata, model).sha256 == metadata["content_sha256"]
    for position in (8, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0xFF
        with pytest.raises(InstructionIntegrityError, match="content hash"):
            load_instruction(bytes(tampered), metadata, model)
    tensors = safetensors.torch.load(data)
    name = next(n for n in sorted(tensors) if n.startswith(("keys/", "values/", "tokens")))  # a learned tensor
    for changed in ({**tensors, "extra": tensors[name].clone()}, {**tensors, name: tensors[name][..., :1].clone()}):
        rehashed = safetensors.torch.save(changed)
        with pytest.raises(InstructionIntegrityError, match="tensor"):
            load_instruction(rehashed, {**metadata, "content_sha256": _content_hash(rehashed, metadata)}, model)
    other = load_model(build_tiny_ip2p(tmp_path / "other-model", seed=1))
    with pytest.raises(InstructionModelMismatch):
        load_instruction(data, metadata, other)


def test_path_like_key_in_the_index_costs_one_row_not_the_run(tmp_path) -> None:
    store = open_store(str(tmp_path / "store"))
    (tmp_path / "secret.png").write_bytes(b"outside the store")  # where the key would lead
    index = build_shop(store, partitions=1, per_partition=2)
    bad = pd.DataFrame(
        [{"image_id": "escape", "key": "catalogue/../../secret.png", "category": "warm", "partition": "p0"}]
    )
    buf = io.BytesIO()
    pd.concat([index, bad]).to_parquet(buf, index=False)
    store.put_bytes("catalogue/index.parquet", buf.getvalue())
    [items] = catalogue_partitions.fn(store.uri, None).values()
    problems = {item["image_id"]: item["index_error"] for item in items}
    escape = problems.pop("escape")
    assert escape.startswith("bad key") and "'..' segment" in escape
    assert set(problems.values()) == {""} and len(problems) == 2
    job = PartitionJob(store_uri=store.uri, output_uri=store.uri, run_id="escape-1", partition="p0",
                       items=[i for i in items if i["image_id"] == "escape"], instructions={})
    with disable_run_logger():
        [row] = edit_category(job, "warm", job.items)
    assert (row["error_code"], row["qc_status"], row["source_uri"]) == ("invalid_key", "error",
                                                                        "catalogue/../../secret.png")
    assert "'..' segment" in row["error"]
    with pytest.raises(InvalidKeyError):
        store.get_bytes("catalogue/../../secret.png")
