"""Review decisions kept in the store: the run's deadline, and every decision before it acts.

A decision is written (create-if-absent, first write wins) before anything is published, so a
process killed while publishing loses nothing: the next run of the same run id replays the recorded
decisions onto the rows still pending before it asks anyone again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from prefect.context import FlowRunContext

from storage.run_layout import decision_key, decisions_prefix, gate_key
from storage.store import open_store
from tasks.params import ReviewDecision


def review_deadline(store_uri: str, run_id: str, timeout_s: int) -> datetime:
    """The run's review deadline, fixed by the first gate and kept in the store.

    A suspended run re-executes from the top on resume, and a crashed run is simply run again; both
    must keep the original deadline rather than start a new one. The record also lets
    `expire_overdue_reviews` find runs whose suspended gate timed out with no process left to act.
    """
    store = open_store(store_uri)
    key = gate_key(run_id)
    deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
    store.create_if_absent(key, json.dumps({"deadline": deadline.isoformat()}).encode())
    return datetime.fromisoformat(json.loads(store.get_bytes(key))["deadline"])


def record_decision(store_uri: str, run_id: str, round_no: int, decision: dict) -> dict:
    """Keep a decision in the store before acting on it; returns the record that is kept.

    The key is fixed per flow run and round, and the first write wins: a round replayed by a resumed
    or retried flow run keeps the original record and its `decided_at`, which every row it decides
    gets as `reviewed_at`.
    """
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else "no-flow-run"
    store = open_store(store_uri)
    key = decision_key(run_id, flow_run_id, round_no)
    record = {"flow_run_id": flow_run_id, "round": round_no, "decided_at": datetime.now(UTC).isoformat(),
              "decision": decision}
    store.create_if_absent(key, json.dumps(record, sort_keys=True).encode())
    return json.loads(store.get_bytes(key))


def recorded_decisions(store_uri: str, run_id: str) -> list[dict]:
    """The run's recorded decisions, oldest first."""
    store = open_store(store_uri)
    prefix = decisions_prefix(run_id)
    records = []
    for key in store.list(prefix):
        try:
            record = json.loads(store.get_bytes(key))
            ReviewDecision(**record["decision"])
            datetime.fromisoformat(record["decided_at"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"run {run_id}: unreadable review decision {store.uri_for(key)}: {exc}") from None
        records.append(record)
    return sorted(records, key=lambda r: r["decided_at"])
