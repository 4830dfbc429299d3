"""`retouch review`: find the paused run by its catalogue run id, refuse anonymous decisions, resume."""

from __future__ import annotations

import threading
import time

from prefect import flow
from typer.testing import CliRunner

from cli.main import app
from cli.review import ReviewCliError, find_paused_flow_run
from flows.review import review_and_publish
from storage.manifest import read_manifest
from storage.store import open_store
from tasks.params import ReviewConfig
from tests.flows.review_helpers import published_keys, write_run

runner = CliRunner()


@flow
def gate(config: dict, run_id: str) -> dict:
    """Shaped like catalogue_refresh: the store comes from the `config` parameter the CLI reads."""
    return review_and_publish(config["store_uri"], run_id, ReviewConfig(timeout_s=60, poll_interval_s=1))


def _wait_paused(run_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            find_paused_flow_run(run_id)
            return
        except ReviewCliError:
            time.sleep(0.3)
    raise AssertionError(f"run {run_id} never paused")


def test_missing_or_empty_reviewer_is_refused_before_anything_is_sent() -> None:
    missing = runner.invoke(app, ["review", "approve", "r1", "--all-passing"])
    assert missing.exit_code == 2 and "Missing option '--reviewer'" in missing.output
    empty = runner.invoke(app, ["review", "approve", "r1", "--all-passing", "--reviewer", ""])
    assert empty.exit_code == 2 and "reviewer: String should have at least 1 character" in empty.output
    vague = runner.invoke(app, ["review", "approve", "r1", "--reviewer", "alice"])
    assert vague.exit_code == 2 and "--all-passing and/or --ids" in vague.output


def test_list_then_reject_ids_then_approve_passing_resumes_the_paused_run(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "cli-1")
    outputs: dict[str, object] = {}

    def reviewer() -> None:
        _wait_paused("cli-1")
        outputs["list"] = runner.invoke(app, ["review", "list"])
        outputs["typo"] = runner.invoke(
            app, ["review", "approve", "cli-1", "--ids", "bag-2,bag-9", "--all-passing", "--reviewer", "dana"]
        )
        outputs["reject"] = runner.invoke(
            app, ["review", "reject", "cli-1", "--ids", "bag-1", "--reviewer", "dana", "--comment", "crop"]
        )
        _wait_paused("cli-1")  # only bag-1 was decided; the run asks again for the rest
        outputs["again"] = runner.invoke(app, ["review", "reject", "cli-1", "--ids", "bag-1", "--reviewer", "dana"])
        outputs["approve"] = runner.invoke(
            app, ["review", "approve", "cli-1", "--all-passing", "--reviewer", "erin"]
        )

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    result = gate({"store_uri": store.uri}, "cli-1")
    thread.join(10)

    listing = outputs["list"].output
    assert outputs["list"].exit_code == 0
    assert (
        "cli-1" in listing
        and "bags: fail 1, pass 2" in listing
        and "shoes: error 1, flag 1, pass 1" in listing
    )
    assert "flagged or failed: bag-3" in listing  # the ids a reviewer should open first
    # A mistyped id is refused before anything is sent (it would have rejected the item it meant).
    assert outputs["typo"].exit_code == 2
    assert "run cli-1 has no pending item bag-9 (unknown id or already decided); nothing was sent" in (
        outputs["typo"].output
    )
    assert outputs["again"].exit_code == 2 and "no pending item bag-1" in outputs["again"].output
    assert outputs["reject"].exit_code == 0, outputs["reject"].output
    assert "0 to approve, 1 to reject" in outputs["reject"].output
    assert outputs["approve"].exit_code == 0, outputs["approve"].output
    assert "2 to approve, 3 to reject" in outputs["approve"].output
    assert result["reviewers"] == ["dana", "erin"]
    m = read_manifest(store, "cli-1").set_index("image_id")
    assert m.loc["bag-1", ["review_status", "reviewer"]].tolist() == ["rejected", "dana"]
    assert m.loc["bag-2", ["review_status", "reviewer"]].tolist() == ["approved", "erin"]
    assert published_keys(store) == ["published/bags/bag-2.png", "published/shoes/shoe-1.png"]
    gone = runner.invoke(app, ["review", "approve", "cli-1", "--all-passing", "--reviewer", "erin"])
    assert gone.exit_code == 2 and "no paused flow run is waiting for review of run 'cli-1'" in gone.output
