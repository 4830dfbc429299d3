"""The review gate: verdict rules, pause/resume with a required reviewer, timeout, publishing."""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from prefect import flow, get_client
from prefect.artifacts import Artifact
from prefect.flow_engine import run_flow_sync
from prefect.states import Cancelled, Scheduled
from typer.testing import CliRunner

from cli.main import app
from flows.expire import expire_overdue_reviews, expire_reviews
from flows.review import ReviewPolicyError, review_and_publish
from storage.manifest import read_manifest, write_manifest_partition
from storage.run_layout import contact_sheet_key, decision_key, gate_key
from storage.store import Store, open_store
from tasks.decisions import recorded_decisions
from tasks.params import RefreshConfig, ReviewConfig, ReviewDecision
from tasks.publish import publish_object
from tasks.report import describe, report_category
from tasks.review import pending_rows, row_versions, summarise, verdicts_for
from tasks.signing import SIGNING_KEY_ENV, sign, signature_problem
from tests.flows.review_helpers import Reviewer, png, published_keys, write_run

KEY = "test-signing-key-" + "0123456789abcdef" * 2
OTHER_KEY = "another-signing-key-" + "fedcba9876543210" * 2


@pytest.fixture
def signing_key(monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    return KEY.encode()


def put_record(store: Store, run_id: str, flow_run_id: str, round_no: int, decision: ReviewDecision | dict,
               items: dict[str, str], decided_at: str = "2026-01-02T03:04:05+00:00", key: str | None = KEY,
               recorded_for: str | None = None) -> str:
    """A decision record as the gate writes it, signed with `key` (None: unsigned); returns its key."""
    fields = decision.model_dump(mode="json") if isinstance(decision, ReviewDecision) else decision
    record = sign({"run_id": recorded_for or run_id, "flow_run_id": flow_run_id, "round": round_no,
                   "decided_at": decided_at, "decision": fields, "items": items}, key.encode() if key else None)
    where = decision_key(run_id, flow_run_id, round_no)
    store.put_bytes(where, json.dumps(record).encode())
    return where


def versions(store: Store, run_id: str, *image_ids: str) -> dict[str, str]:
    rows = read_manifest(store, run_id)
    return row_versions(rows[rows["image_id"].isin(image_ids)] if image_ids else rows)


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


@pytest.mark.parametrize(
    "name",
    [" ", "\u200b", "a\u200bb", "\u202eevil", "alice\nINFO forged log line", "x" * 100_000, "ann\u00a0lee", "\x00"],
)
def test_reviewer_names_that_hide_forge_or_flood_are_refused_by_form_and_cli(name) -> None:
    with pytest.raises(ValueError, match="reviewer"):
        ReviewDecision(reviewer=name)
    result = CliRunner().invoke(app, ["review", "approve", "run-x", "--all-passing", "--reviewer", name])
    assert result.exit_code == 2 and "decision refused: reviewer" in result.output


def test_reviewer_names_are_stripped_and_bounded_not_rejected_for_being_foreign() -> None:
    assert ReviewDecision(reviewer="  Zoë O'Brien ").reviewer == "Zoë O'Brien"
    assert ReviewDecision(reviewer="李雷").reviewer == "李雷"
    assert len(ReviewDecision(reviewer="x" * 200).reviewer) == 200


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
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url  # presigned, valid one hour by default
    with urllib.request.urlopen(url, timeout=10) as response:  # opens without credentials
        assert response.read() == png(5)


def test_auto_policy_publishes_passing_only_and_rerun_is_noop(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "auto-1")
    result = gate(store.uri, "auto-1", ReviewConfig(policy="auto_approve_passing"))
    assert result["outcome"] == "decided"
    assert result["published"] == {"created": 3, "unchanged": 0, "replaced": 0, "superseded": 0, "unpublished": 0}
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
            {"reviewer": "a\u200bb", "approve_all_passing": True},  # zero-width: refused by the form's schema
            {"reviewer": "x" * 300, "approve_all_passing": True},  # too long: refused too
            # Past the schema, not past the reviewer rule: the run refuses it and asks again.
            {"reviewer": "ann\u00a0lee", "approve_all_passing": True},
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
    assert [o.split(":")[0] for o in reviewer.outcomes] == ["refused"] * 4 + ["accepted", "accepted"]
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


def test_recorded_decision_is_replayed_by_the_next_run_without_asking_again(
    prefect_harness, tmp_path, signing_key
) -> None:
    """The process died after the decision was recorded and before every partition was published."""
    store = open_store(str(tmp_path))
    write_run(store, "crashed-1")
    decision = ReviewDecision(reviewer="alice", approve_all_passing=True, categories=["bags"], comment="ok")
    put_record(store, "crashed-1", "killed-flow-run", 1, decision, versions(store, "crashed-1", "bag-1", "bag-2", "bag-3"))
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


def test_untrusted_decision_records_are_refused_named_and_change_nothing(
    prefect_harness, tmp_path, signing_key, caplog
) -> None:
    """Anyone who can write to review/ can drop files there; only records the gate signed count."""
    store = open_store(str(tmp_path))
    write_run(store, "badrec-1")
    everything = versions(store, "badrec-1")
    approve = ReviewDecision(reviewer="mallory", approve_all_passing=True, approve_ids=["bag-3", "shoe-2"])
    planted = {"run_id": "badrec-1", "flow_run_id": "planted", "round": 1, "decided_at": "2026-01-02T03:04:05+00:00",
               "decision": approve.model_dump(mode="json"), "items": everything}
    store.put_bytes(decision_key("badrec-1", "planted", 1), json.dumps(planted).encode())  # not signed
    altered = put_record(store, "badrec-1", "altered", 1, ReviewDecision(reviewer="alice", categories=[]), {})
    record = json.loads(store.get_bytes(altered))
    record["decision"], record["items"] = approve.model_dump(mode="json"), everything
    store.put_bytes(altered, json.dumps(record).encode())
    put_record(store, "badrec-1", "other-key", 1, approve, everything, key=OTHER_KEY)
    put_record(store, "badrec-1", "copied", 1, approve, everything, recorded_for="other-run-1")
    put_record(store, "badrec-1", "bad-name", 1, {**approve.model_dump(mode="json"), "reviewer": "\u202eyrrellam"},
               everything)
    store.put_bytes(decision_key("badrec-1", "garbage", 1), b"{not json")

    result = gate(store.uri, "badrec-1", ReviewConfig(timeout_s=3, poll_interval_s=1))

    reasons = {r["uri"].rsplit("/", 1)[1]: r["reason"] for r in result["refused_records"]}
    assert reasons.keys() == {f"{n}-001.json" for n in ("planted", "altered", "other-key", "copied", "bad-name",
                                                          "garbage")}
    assert reasons["planted-001.json"] == "not signed"
    assert reasons["altered-001.json"].startswith("altered after it was signed")
    assert reasons["other-key-001.json"].startswith("signed with another key")
    assert "copied" in reasons["copied-001.json"] and "reviewer" in reasons["bad-name-001.json"]
    assert reasons["garbage-001.json"].startswith("unreadable")
    assert "refused review record" in caplog.text and "planted-001.json" in caplog.text
    assert result["outcome"] == "expired" and result["reviewers"] == []
    assert set(statuses(store, "badrec-1").values()) == {"expired"}
    assert published_keys(store) == []


def test_without_a_signing_key_no_record_is_replayed_and_the_gate_asks_again(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    store = open_store(str(tmp_path))
    write_run(store, "nokey-1")
    put_record(store, "nokey-1", "earlier", 1, ReviewDecision(reviewer="alice", approve_all_passing=True),
               versions(store, "nokey-1"))
    reviewer = Reviewer("nokey-1", [{"reviewer": "bob", "approve_all_passing": True}])
    reviewer.start()
    result = gate(store.uri, "nokey-1", HUMAN)
    reviewer.join(5)
    assert reviewer.outcomes == ["accepted"]
    assert [r["reason"] for r in result["refused_records"]][:1] == [
        "no signing key is configured (RETOUCH_SIGNING_KEY or RETOUCH_SIGNING_SECRET_BLOCK)"]
    assert result["reviewers"] == ["bob"] and set(read_manifest(store, "nokey-1")["reviewer"]) == {"bob"}
    ours = [json.loads(store.get_bytes(k)) for k in store.list("review/run=nokey-1/decisions/") if "earlier" not in k]
    assert [r["signature"] for r in ours] == [None]  # kept for the audit trail, never replayed


def test_a_decision_covers_only_the_rows_it_decided_and_new_items_wait_with_a_fresh_deadline(
    prefect_harness, tmp_path, signing_key
) -> None:
    """A reused run id: alice decided every item once; then p1 was edited again and p2 added."""
    store = open_store(str(tmp_path))
    write_run(store, "reuse-1")
    put_record(store, "reuse-1", "first-run", 1, ReviewDecision(reviewer="alice", approve_all_passing=True),
               versions(store, "reuse-1"))
    past = datetime.now(UTC) - timedelta(hours=1)
    store.put_bytes(gate_key("reuse-1"), json.dumps({"deadline": past.isoformat(), "opened_at": past.isoformat(),
                                                     "items": versions(store, "reuse-1")}).encode())
    write_run(store, "reuse-1", {"p1": [("bag-1", "bags", "pass"), ("bag-2", "bags", "pass"),
                                        ("bag-3", "bags", "fail")], "p2": [("hat-1", "hats", "pass")]}, shade=60)
    reviewer = Reviewer("reuse-1", [{"reviewer": "bob", "approve_all_passing": True}])
    reviewer.start()
    result = gate(store.uri, "reuse-1", HUMAN)
    reviewer.join(5)

    assert reviewer.outcomes == ["accepted"]  # asked, although the old deadline had passed
    m = read_manifest(store, "reuse-1").set_index("image_id")
    assert set(m.loc[["shoe-1", "shoe-2", "shoe-3"], "reviewer"]) == {"alice"}
    assert set(m.loc[["bag-1", "bag-2", "bag-3", "hat-1"], "reviewer"]) == {"bob"}
    assert m.loc[["bag-1", "hat-1"], "review_status"].tolist() == ["approved", "approved"]
    assert result["reviewers"] == ["alice", "bob"]
    gate_record = json.loads(store.get_bytes(gate_key("reuse-1")))
    assert datetime.fromisoformat(gate_record["deadline"]) > datetime.now(UTC) and "hat-1" in gate_record["items"]
    records, refused = recorded_decisions(store.uri, "reuse-1")
    assert refused == [] and [r["decision"]["reviewer"] for r in records] == ["alice", "bob"]
    assert signature_problem(records[1], signing_key) is None
    assert sorted(records[1]["items"]) == ["bag-1", "bag-2", "bag-3", "hat-1"]


def test_an_older_runs_late_approval_never_replaces_a_newer_runs_published_image(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "older-1", shade=10)
    write_run(store, "newer-1", shade=50)  # edited later
    auto = ReviewConfig(policy="auto_approve_passing")
    assert gate(store.uri, "newer-1", auto)["published"]["created"] == 3
    newer = {k: store.get_bytes(k) for k in published_keys(store)}

    late = gate(store.uri, "older-1", auto)

    assert late["published"] == {"created": 0, "unchanged": 0, "replaced": 0, "superseded": 3, "unpublished": 0}
    assert {k: store.get_bytes(k) for k in published_keys(store)} == newer
    old = read_manifest(store, "older-1").set_index("image_id")
    assert old.loc["shoe-1", ["review_status", "error_code"]].tolist() == ["approved", "superseded"]
    assert pd.isna(old.loc["shoe-1", "published_uri"])
    assert read_manifest(store, "newer-1").set_index("image_id").loc["shoe-1", "published_uri"] == store.uri_for(
        "published/shoes/shoe-1.png")


def test_a_rejection_takes_back_what_the_same_run_published_and_nothing_else(prefect_harness, tmp_path) -> None:
    """A manifest part rewritten to pending after publishing (the old lost-marker path), then rejected."""
    store = open_store(str(tmp_path))
    write_run(store, "again-1")
    assert gate(store.uri, "again-1", ReviewConfig(policy="auto_approve_passing"))["published"]["created"] == 3
    write_run(store, "again-2", {"p0": [("shoe-1", "shoes", "pass")]}, shade=90)
    gate(store.uri, "again-2", ReviewConfig(policy="auto_approve_passing"))
    write_run(store, "again-1")  # back to pending, same outputs
    reviewer = Reviewer("again-1", [{"reviewer": "bob", "comment": "all wrong"}])
    reviewer.start()
    result = gate(store.uri, "again-1", HUMAN)
    reviewer.join(5)
    assert result["published"]["unpublished"] == 2
    assert published_keys(store) == ["published/shoes/shoe-1.png"]  # again-2's, not again-1's
    assert store.get_bytes("published/shoes/shoe-1.png") == png(90)
    assert set(statuses(store, "again-1").values()) == {"rejected"}
    assert read_manifest(store, "again-1")["published_uri"].isna().all()


@flow
def policy_probe(config: RefreshConfig) -> dict:
    return review_and_publish(config.output_uri, "policy-1", config.review)


def test_auto_approval_asked_by_a_run_of_a_human_review_deployment_is_refused(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "policy-1")
    auto = {"config": {"store_uri": store.uri, "review": {"policy": "auto_approve_passing"}}}
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(policy_probe.name)
        human = client.create_deployment(flow_id, "human-review",
                                         parameters={"config": {"store_uri": store.uri, "review": {"policy": "human"}}})
        demo = client.create_deployment(flow_id, "demo", parameters=auto)
        runs = [client.create_flow_run_from_deployment(d, parameters=auto) for d in (human, demo)]

    refused = run_flow_sync(policy_probe, flow_run=runs[0], parameters=runs[0].parameters, return_type="state")
    assert refused.is_failed()
    with pytest.raises(ReviewPolicyError, match="deployment 'human-review' fixes 'human'"):
        refused.result()
    assert published_keys(store) == [] and set(statuses(store, "policy-1").values()) == {"pending"}
    allowed = run_flow_sync(policy_probe, flow_run=runs[1], parameters=runs[1].parameters, return_type="state")
    assert allowed.is_completed() and allowed.result()["published"]["created"] == 3


def test_reports_keep_contact_sheet_keys_and_links_live_only_as_long_as_configured(prefect_harness, s3_uri) -> None:
    store = open_store(s3_uri)
    write_run(store, "rep-1")
    rows = read_manifest(store, "rep-1")
    rows["source_uri"] = rows["output_uri"]
    for partition, part in rows.groupby("partition"):
        write_manifest_partition(store, "rep-1", partition, part.to_dict("records"))

    @flow
    def report() -> dict:
        return report_category(s3_uri, s3_uri, "rep-1", "bags", {}, link_expiry_s=600)

    assert report()["contact_sheet"] == contact_sheet_key("rep-1", "bags")
    artifact = Artifact.get("contact-sheet-bags")
    assert "X-Amz-Expires=600" in artifact.data and "valid 10 min" in artifact.description
