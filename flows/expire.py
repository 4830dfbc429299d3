"""The hourly sweep for review gates nobody answered (deployed as `expire-reviews/hourly`)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType

from storage.run_layout import REVIEW_PREFIX, gate_run_id
from storage.store import open_store
from tasks.decisions import read_gate
from tasks.publish import publish_partition
from tasks.review import covered_rows, pending_rows, run_tag, verdicts_for


def expire_overdue_reviews(store_uri: str, now: datetime | None = None) -> dict[str, list[str]]:
    """Mark pending rows `expired` for every run whose review deadline has passed.

    A suspended run that nobody resumes is failed by the Prefect server at the deadline, with no
    process left to update the manifest; this sweep records the outcome (hourly as the
    `expire-reviews/hourly` deployment, or `retouch review expire STORE`). Nothing is published.
    A run that still has a flow run scheduled or running is left alone: it was resumed in time and
    will apply its decision itself. Only the items the gate opened for expire: items a reused run id
    added since are not overdue. Returns the run ids `expired` and `still_running`.
    """
    store = open_store(store_uri)
    now = now or datetime.now(UTC)
    swept: dict[str, list[str]] = {"expired": [], "still_running": []}
    for key in store.list(REVIEW_PREFIX):
        run_id = gate_run_id(key)
        if run_id is None:
            continue
        gate = read_gate(store_uri, run_id)
        if datetime.fromisoformat(gate["deadline"]) > now:
            continue
        rows = pending_rows(store_uri, run_id)
        if "items" in gate:  # gates recorded before items were: every pending row
            rows = covered_rows(rows, gate["items"])
        if rows.empty:
            continue
        if active_flow_runs(run_id):
            swept["still_running"].append(run_id)
            continue
        when = now.isoformat()
        for partition in sorted(rows["partition"].astype(str).unique()):
            part = rows[rows["partition"].astype(str) == partition]
            publish_partition.fn(
                store_uri, run_id, partition, verdicts_for(part, outcome="timeout"), None, when
            )
        swept["expired"].append(run_id)
    return swept


def active_flow_runs(run_id: str) -> list[str]:
    """Flow runs of `run_id` that are scheduled, pending or running (e.g. resumed, waiting for a worker)."""
    active = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[run_tag(run_id)]),
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])
        ),
    )
    with get_client(sync_client=True) as client:
        return [str(r.id) for r in client.read_flow_runs(flow_run_filter=active)]


@flow(name="expire-reviews")
def expire_reviews(store_uri: str) -> dict[str, list[str]]:
    """The sweep as a flow, deployed hourly next to the nightly refresh."""
    swept = expire_overdue_reviews(store_uri)
    logger = get_run_logger()
    logger.info("expired the pending items of %d run(s): %s", len(swept["expired"]),
                ", ".join(swept["expired"]) or "-")
    if swept["still_running"]:
        logger.info("past the deadline but still running, left alone: %s", ", ".join(swept["still_running"]))
    return swept
