"""Review decisions kept in the store: the run's deadline, and every decision before it acts.

A decision is written before anything is published, signed by the gate (tasks/signing.py), with the
exact items it decided: each image id with the `created_at` of the manifest row the reviewer was
shown. So a process killed while publishing loses nothing (the next run of the same run id replays
the signed records onto those rows, if they are still pending), and a replay never reaches an item
the reviewer did not see: a new item, or a re-edited one, waits for a person.

Records that are unsigned, altered, signed with another key, or copied from another run are refused,
and named in the log and in the run summary; they change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from prefect.context import FlowRunContext

from storage.run_layout import decision_key, decisions_prefix, gate_key
from storage.store import open_store
from tasks.params import ReviewDecision
from tasks.signing import sign, signature_problem, signing_key


def review_deadline(store_uri: str, run_id: str, timeout_s: int, items: Mapping[str, str]) -> datetime:
    """The deadline for the run's pending `items` (image id -> row version), kept in the store.

    A suspended run re-executes from the top, and a crashed run is simply run again: both keep the
    deadline the gate first set for the same items. A reused run id that brings items the gate has
    never opened for gets a fresh deadline (for everything pending), so new items are never expired
    unseen. The record also lets `expire_overdue_reviews` find runs whose suspended gate timed out.
    """
    store = open_store(store_uri)
    key = gate_key(run_id)
    now = datetime.now(UTC)
    fresh = {"deadline": (now + timedelta(seconds=timeout_s)).isoformat(), "opened_at": now.isoformat(),
             "items": dict(sorted(items.items()))}
    if store.create_if_absent(key, json.dumps(fresh).encode()):
        return datetime.fromisoformat(fresh["deadline"])
    gate = read_gate(store_uri, run_id)
    covered = gate.get("items")
    if covered is not None and all(covered.get(i) == v for i, v in items.items()):
        return datetime.fromisoformat(gate["deadline"])
    fresh["items"] = dict(sorted({**(covered or {}), **items}.items()))
    store.put_bytes(key, json.dumps(fresh).encode(), content_type="application/json")
    return datetime.fromisoformat(fresh["deadline"])


def read_gate(store_uri: str, run_id: str) -> dict:
    """The run's gate record; `ValueError` naming the file if it cannot be read."""
    store = open_store(store_uri)
    key = gate_key(run_id)
    try:
        gate = json.loads(store.get_bytes(key))
        datetime.fromisoformat(gate["deadline"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"run {run_id}: unreadable review gate {store.uri_for(key)}: {exc}") from None
    return gate


def record_decision(
    store_uri: str, run_id: str, round_no: int, decision: dict, items: Mapping[str, str]
) -> tuple[dict, list[dict]]:
    """Keep a signed decision in the store before acting on it; returns (the record to act on, refused).

    The key is fixed per flow run and round, and the first valid write wins: a round replayed by a
    resumed or retried flow run keeps the original record, its items and its `decided_at`, which
    every row it decides gets as `reviewed_at`. A record already at the key that does not verify
    (planted, or written without a key) is refused, named in `refused`, and replaced by this one.
    """
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else "no-flow-run"
    store = open_store(store_uri)
    key = decision_key(run_id, flow_run_id, round_no)
    signer = signing_key()
    record = sign({"run_id": run_id, "flow_run_id": flow_run_id, "round": round_no,
                   "decided_at": datetime.now(UTC).isoformat(), "decision": decision,
                   "items": dict(sorted(items.items()))}, signer)
    data = json.dumps(record, sort_keys=True).encode()
    if store.create_if_absent(key, data):
        return record, []
    stored, problem = _checked(store.get_bytes(key), key, run_id, signer)
    if problem is None:
        return stored, []
    store.put_bytes(key, data, content_type="application/json")
    return record, [{"uri": store.uri_for(key), "reason": problem}]


def recorded_decisions(store_uri: str, run_id: str) -> tuple[list[dict], list[dict]]:
    """The run's trustworthy recorded decisions, oldest first, and the refused ones ({uri, reason})."""
    store = open_store(store_uri)
    signer = signing_key()
    records, refused = [], []
    for key in store.list(decisions_prefix(run_id)):
        record, problem = _checked(store.get_bytes(key), key, run_id, signer)
        if problem is None:
            records.append(record)
        else:
            refused.append({"uri": store.uri_for(key), "reason": problem})
    return sorted(records, key=lambda r: r["decided_at"]), refused


def _checked(data: bytes, key: str, run_id: str, signer: bytes | None) -> tuple[dict, str | None]:
    """The record in `data` and None, or why it cannot be replayed (unreadable, unsigned, ...)."""
    try:
        record = json.loads(data)
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError) as exc:
        return {}, f"unreadable: {exc}"
    if problem := signature_problem(record, signer):
        return record, problem
    try:
        if record["run_id"] != run_id or decision_key(run_id, record["flow_run_id"], record["round"]) != key:
            return record, f"recorded for run {record['run_id']!r} at another key (copied)"
        ReviewDecision(**record["decision"])  # the reviewer rules apply to replayed names too
        datetime.fromisoformat(record["decided_at"])
        if not isinstance(record["items"], dict):
            raise TypeError("items must map image ids to row versions")
    except (ValueError, KeyError, TypeError) as exc:
        return record, f"invalid: {exc}"
    return record, None
