"""The review gate: verdict rules, pause/resume with a required reviewer, timeout, publishing."""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from prefect import flow, get_client
from prefect.states import Cancelled, Scheduled

from flows.expire import expire_overdue_reviews, expire_reviews
from flows.review import review_and_publish
from storage.manifest import read_manifest
from storage.run_layout import contact_sheet_key, decision_key, gate_key
from storage.store import Store, open_store
from tasks.params import ReviewConfig, ReviewDecision
from tasks.publish import publish_object
from tasks.report import describe
from tasks.review import pending_rows, summarise, verdicts_for
from tests.flows.review_helpers import Reviewer, png, published_keys, write_run


@flow
def gate(store_uri: str, run_id: str, config: ReviewConfig) -> dict:
    return review_and_publish(store_uri, run_id, config)


def statuses(store: Store, run_id: str) -> dict[str, str]:
    m = read_manifest(store, run_id)
    return dict(zip(m["image_id"], m["review_status"], strict=True))


HUMAN = ReviewConfig(policy="human", timeout_s=60, poll_interval_s=1)


def _rows(*items: tuple[str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"image_id": i, "category": c, "qc_status": q, "review_status": "pending"} for i, c, q in items]
    )


def test_verdict_rules_reject_wins_errors_never_approved_scope_leaves_rest_pending() -> None:
    rows = _rows(
        ("a", "shoes", "pass"),
        ("b", "shoes", "flag"),
        ("c", "shoes", "error"),
        ("d", "bags", "pass"),
        ("e", "bags", "pass"),
    )
    v = verdicts_for(
        rows,
        outcome="decision",
        approve_all_passing=True,
        approve_ids=["b", "c", "e"],
        reject_ids=["e"],
        categories=["shoes"],
    )
    # b: flagged but explicitly approved; c: error rows are never published; e: reject wins and an
    # explicit id is decided even outside the scope; d: other category, keeps waiting.
    assert v == {"a": "approved", "b": "approved", "c": "rejected", "e": "rejected"}
    assert verdicts_for(rows, outcome="decision", reject_ids=["a"], categories=[]) == {"a": "rejected"}
    assert set(verdicts_for(rows, outcome="timeout").values()) == {"expired"}


def test_reviewer_is_required_and_not_prefilled() -> None:
    schema = ReviewDecision.with_initial_data(description="x").model_json_schema()
    assert "reviewer" in schema["required"] and "default" not in schema["properties"]["reviewer"]
    with pytest.raises(ValueError, match="reviewer"):
        ReviewDecision(reviewer="")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_publish_object_is_create_if_absent_within_a_run_and_newer_run_replaces(
    backend: str, tmp_path, request
) -> None:
    store = open_store(str(tmp_path) if backend == "local" else request.getfixturevalue("s3_uri"))
    store.put_bytes("edited/a.png", png(1))
    store.put_bytes("edited/b.png", png(2))
    assert publish_object(store, "edited/a.png", "published/x/a.png") == "created"
    assert publish_object(store, "edited/a.png", "published/x/a.png") == "unchanged"
    assert publish_object(store, "edited/b.png", "published/x/a.png") == "replaced"
    assert store.get_bytes("published/x/a.png") == png(2)
    assert published_keys(store) == ["published/x/a.png"]


def test_review_description_counts_qc_per_category_lists_flags_and_links_presigned_contact_sheets(s3_uri) -> None:
    store = open_store(s3_uri)
    write_run(store, "desc-1")
    store.put_bytes(contact_sheet_key("desc-1", "bags"), png(5))
    deadline = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)

    text = describe(s3_uri, "desc-1", summarise(pending_rows(s3_uri, "desc-1")), deadline=deadline)

    assert "**6** items wait for a decision (deadline 2026-01-02 03:04 UTC" in text
    assert "| bags | 2 | 0 | 1 | 0 | [bags.png](" in text
    assert "| shoes | 1 | 1 | 0 | 1 | - |" in text  # no contact sheet for shoes
    assert "- bags: bag-3" in text and "- shoes: shoe-2" in text  # QC flagged or failed
    url = re.search(r"\[bags\.png\]\((.+?)\)", text).group(1)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=604800" in url  # presigned, valid 7 days
    with urllib.request.urlopen(url, timeout=10) as response:  # opens without credentials
        assert response.read() == png(5)


def test_auto_policy_publishes_passing_only_and_rerun_is_noop(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "auto-1")
    result = gate(store.uri, "auto-1", ReviewConfig(policy="auto_approve_passing"))
    assert result["outcome"] == "decided"
    assert result["published"] == {"created": 3, "unchanged": 0, "replaced": 0}
    assert statuses(store, "auto-1") == {
        "shoe-1": "approved",
        "shoe-2": "rejected",
        "shoe-3": "rejected",
        "bag-1": "approved",
        "bag-2": "approved",
        "bag-3": "rejected",
    }
    assert published_keys(store) == [
        "published/bags/bag-1.png",
        "published/bags/bag-2.png",
        "published/shoes/shoe-1.png",
    ]
    again = gate(store.uri, "auto-1", ReviewConfig(policy="auto_approve_passing"))
    assert again["outcome"] == "nothing_pending" and again["published"] == {}


def test_human_decision_from_another_thread_refuses_missing_reviewer_then_publishes(
    prefect_harness, s3_uri
) -> None:
    store = open_store(s3_uri)
    write_run(store, "human-1")
    reviewer = Reviewer(
        "human-1",
        [
            {"approve_all_passing": True},  # no reviewer: the server refuses, the run stays paused
            {"reviewer": "", "approve_all_passing": True},  # empty reviewer: refused too
            {
                "reviewer": "alice",
                "approve_all_passing": True,
                "approve_ids": ["shoe-2"],
                "reject_ids": ["bag-2"],
                "comment": "bag-2 colour is off",
            },
        ],
    )
    reviewer.start()
    state = gate(s3_uri, "human-1", HUMAN, return_state=True)
    reviewer.join(5)
    assert state.is_completed()
    assert [o.split(":")[0] for o in reviewer.outcomes] == ["refused", "refused", "accepted"]
    assert "reviewer" in reviewer.outcomes[0]
    result = state.result()
    assert result["reviewers"] == ["alice"] and result["comments"] == ["bag-2 colour is off"]
    assert statuses(store, "human-1") == {
        "shoe-1": "approved",
        "shoe-2": "approved",
        "shoe-3": "rejected",
        "bag-1": "approved",
        "bag-2": "rejected",
        "bag-3": "rejected",
    }
    m = read_manifest(store, "human-1").set_index("image_id")
    assert set(m["reviewer"]) == {"alice"}
    assert str(m["reviewed_at"].dt.tz) == "UTC"
    assert abs(datetime.now(UTC) - m.loc["shoe-1", "reviewed_at"].to_pydatetime()) < timedelta(minutes=2)
    assert m.loc["shoe-2", "published_uri"] == store.uri_for("published/shoes/shoe-2.png")
    assert pd.isna(m.loc["bag-2", "published_uri"])
    assert published_keys(store) == [
        "published/bags/bag-1.png",
        "published/shoes/shoe-1.png",
        "published/shoes/shoe-2.png",
    ]


def test_reject_publishes_nothing_and_scoped_decisions_take_two_rounds(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "reject-1")
    reviewer = Reviewer(
        "reject-1",
        [
            {"reviewer": "bob", "categories": ["shoes"]},  # nothing approved: all shoes rejected
            {"reviewer": "carol", "categories": ["bags"], "comment": "whole batch off"},
        ],
    )
    reviewer.start()
    result = gate(store.uri, "reject-1", HUMAN)
    reviewer.join(5)
    assert reviewer.outcomes == ["accepted", "accepted"]
    assert result["reviewers"] == ["bob", "carol"]
    assert result["review_status"] == {"rejected": 6}
    assert published_keys(store) == []
    m = read_manifest(store, "reject-1")
    assert dict(zip(m["category"], m["reviewer"], strict=True)) == {"shoes": "bob", "bags": "carol"}


def test_timeout_expires_everything_publishes_nothing_and_run_completes(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "late-1")
    state = gate(store.uri, "late-1", ReviewConfig(timeout_s=2, poll_interval_s=1), return_state=True)
    assert state.is_completed()
    assert state.result()["outcome"] == "expired"
    assert set(statuses(store, "late-1").values()) == {"expired"}
    assert published_keys(store) == []
    assert read_manifest(store, "late-1")["reviewer"].isna().all()


def _gate_due(store: Store, run_id: str, deadline: datetime) -> None:
    store.put_bytes(gate_key(run_id), json.dumps({"deadline": deadline.isoformat()}).encode())


def test_expire_reviews_flow_expires_overdue_pending_rows_publishes_nothing_and_skips_runs_not_due(
    prefect_harness, tmp_path
) -> None:
    store = open_store(str(tmp_path))
    now = datetime.now(UTC)
    write_run(store, "old-1")
    write_run(store, "new-1")
    _gate_due(store, "old-1", now - timedelta(minutes=1))
    _gate_due(store, "new-1", now + timedelta(hours=1))
    manifest_before = {k: store.get_bytes(k) for k in store.list("manifest/run=new-1/")}

    state = expire_reviews(store.uri, return_state=True)

    assert state.is_completed()
    assert state.result() == {"expired": ["old-1"], "still_running": []}
    old = read_manifest(store, "old-1")
    assert set(old["review_status"]) == {"expired"}
    assert old["reviewer"].isna().all() and old["published_uri"].isna().all()
    assert old["reviewed_at"].notna().all()
    # Not due yet: the files are untouched, not merely rewritten with the same statuses.
    assert {k: store.get_bytes(k) for k in store.list("manifest/run=new-1/")} == manifest_before
    assert set(statuses(store, "new-1").values()) == {"pending"}
    assert published_keys(store) == []
    assert expire_reviews(store.uri) == {"expired": [], "still_running": []}


def test_sweep_leaves_a_run_alone_while_a_flow_run_of_it_is_scheduled_or_running(prefect_harness, tmp_path) -> None:
    """A run resumed just before its deadline may wait for a worker past it; its decision must win."""
    store = open_store(str(tmp_path))
    write_run(store, "late-resume-1")
    _gate_due(store, "late-resume-1", datetime.now(UTC) - timedelta(minutes=1))
    with get_client(sync_client=True) as client:
        resumed = client.create_flow_run(gate, tags=["run:late-resume-1"], state=Scheduled())

        assert expire_overdue_reviews(store.uri) == {"expired": [], "still_running": ["late-resume-1"]}
        assert set(statuses(store, "late-resume-1").values()) == {"pending"}

        client.set_flow_run_state(resumed.id, Cancelled(), force=True)
    assert expire_overdue_reviews(store.uri) == {"expired": ["late-resume-1"], "still_running": []}
    assert set(statuses(store, "late-resume-1").values()) == {"expired"}


def test_unreadable_gate_record_is_an_error_naming_it(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "broken-1")
    store.put_bytes(gate_key("broken-1"), b"{not json")
    with pytest.raises(ValueError, match=r"run broken-1: unreadable review gate .*gate\.json"):
        expire_overdue_reviews(store.uri)


def test_recorded_decision_is_replayed_by_the_next_run_without_asking_again(prefect_harness, tmp_path) -> None:
    """The process died after the decision was recorded and before every partition was published."""
    store = open_store(str(tmp_path))
    write_run(store, "crashed-1")
    decision = ReviewDecision(reviewer="alice", approve_all_passing=True, categories=["bags"], comment="ok")
    store.put_bytes(
        decision_key("crashed-1", "killed-flow-run", 1),
        json.dumps({"flow_run_id": "killed-flow-run", "round": 1, "decided_at": "2026-01-02T03:04:05+00:00",
                    "decision": decision.model_dump(mode="json")}).encode(),
    )
    # Shoes were outside that decision's scope: they are asked about again, and nobody answers.
    result = gate(store.uri, "crashed-1", ReviewConfig(timeout_s=3, poll_interval_s=1))

    assert result["outcome"] == "expired" and result["reviewers"] == ["alice"] and result["comments"] == ["ok"]
    m = read_manifest(store, "crashed-1").set_index("image_id")
    assert m.loc[["bag-1", "bag-2"], "review_status"].tolist() == ["approved", "approved"]
    assert m.loc["bag-3", "review_status"] == "rejected"
    assert set(m.loc[["bag-1", "bag-2", "bag-3"], "reviewer"]) == {"alice"}
    assert set(m.loc[["bag-1", "bag-2", "bag-3"], "reviewed_at"]) == {pd.Timestamp("2026-01-02T03:04:05Z")}
    assert set(m.loc[["shoe-1", "shoe-2", "shoe-3"], "review_status"]) == {"expired"}
    assert published_keys(store) == ["published/bags/bag-1.png", "published/bags/bag-2.png"]


def test_unreadable_decision_record_is_an_error_naming_it(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "badrec-1")
    store.put_bytes(decision_key("badrec-1", "fr", 1), json.dumps({"decision": {"reviewer": ""}}).encode())
    state = gate(store.uri, "badrec-1", HUMAN, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"run badrec-1: unreadable review decision .*fr-001\.json"):
        state.result()
    assert set(statuses(store, "badrec-1").values()) == {"pending"}
