"""The review gate: QC flags, people decide, and only approved outputs reach the catalogue.

`review_and_publish` runs inside `catalogue_refresh` (flow level: Prefect cannot pause a task). It
asks for a `ReviewDecision` until every pending row has a verdict or the deadline passes, then
publishes per partition. Under a deployment it suspends instead of pausing, so no worker waits
overnight; on resume the flow re-runs from the top, the upstream work comes back cached, and the
rows already decided stay decided.

Every decision is written to the store (`review/run=<run_id>/decisions/`) before anything is
published, so a process killed while publishing loses nothing: the next run of the same run id
replays the recorded decisions onto the rows still pending before it asks anyone again.

`expire_reviews` is the hourly sweep for suspended runs nobody answered (deployments/prefect.yaml).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.input.actions import read_flow_run_input
from prefect.input.run_input import keyset_from_base_key
from prefect.states import Running
from pydantic import BaseModel, Field

from storage.keys import InvalidKeyError, join_key
from storage.manifest import read_manifest
from storage.store import open_store
from tasks.publish import publish_partition
from tasks.review import AUTO_REVIEWER, decide_partition, pending_rows, summarise_pending, verdicts_for

RUN_TAG_PREFIX = "run:"
MAX_IDS_IN_DESCRIPTION = 50


class ReviewConfig(BaseModel):
    """How a run's outputs get their verdicts; a flow parameter, so it shows in the UI form."""

    policy: Literal["human", "auto_approve_passing"] = Field(
        default="human",
        description=(
            "human: pause (or suspend under a deployment) until a reviewer decides. "
            "auto_approve_passing: approve QC-pass items and reject the rest without waiting (demo)."
        ),
    )
    timeout_s: int = Field(
        default=24 * 3600,
        ge=1,
        le=14 * 24 * 3600,
        description="How long the run waits for decisions before pending items become expired.",
    )
    poll_interval_s: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="How often a paused run checks for a decision (resume latency is at most this).",
    )


class ReviewDecision(RunInput):
    """The Resume form. `reviewer` is required and never pre-filled, so nobody approves anonymously."""

    reviewer: str = Field(min_length=1, description="Who decides; recorded on every manifest row.")
    approve_all_passing: bool = Field(default=False, description="Approve every item that passed QC.")
    approve_ids: list[str] = Field(
        default_factory=list, description="Approve these image ids, even if QC flagged them."
    )
    reject_ids: list[str] = Field(
        default_factory=list, description="Reject these image ids (wins over approve_ids)."
    )
    categories: list[str] | None = Field(
        default=None,
        description=(
            "Decide every item of these categories; items of other categories keep waiting. "
            "Unset: all categories. Empty list: only the listed ids."
        ),
    )
    comment: str = Field(default="", description="Free text, kept in the run's log and summary.")


def contact_sheet_key(run_id: str, category: str) -> str:
    return join_key("edited", f"run={run_id}", "contact-sheets", f"{category}.png")


def describe(store_uri: str, run_id: str, summary: dict, *, deadline: datetime) -> str:
    """Markdown shown above the Resume form: what waits, how QC judged it, where to look."""
    store = open_store(store_uri)
    lines = [
        f"## Review run `{run_id}`",
        "",
        (
            f"**{summary['total']}** items wait for a decision (deadline {deadline:%Y-%m-%d %H:%M} UTC; "
            "afterwards they expire and nothing is published)."
        ),
        "",
        "| category | pass | flag | fail | error | contact sheet |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for category, counts in sorted(summary["by_category"].items()):
        sheet = "-"
        try:
            key = contact_sheet_key(run_id, category)
            if store.exists(key):
                sheet = f"[{category}.png]({store.presigned_url(key, expires_s=7 * 24 * 3600)})"
        except InvalidKeyError:
            pass
        row = " | ".join(str(counts.get(s, 0)) for s in ("pass", "flag", "fail", "error"))
        lines.append(f"| {category} | {row} | {sheet} |")
    flagged = summary["flagged_ids"]
    if flagged:
        lines += ["", "QC flagged or failed (approve explicitly with *approve_ids* if they look right):"]
        for category, ids in sorted(flagged.items()):
            more = (
                f" and {len(ids) - MAX_IDS_IN_DESCRIPTION} more" if len(ids) > MAX_IDS_IN_DESCRIPTION else ""
            )
            lines.append(f"- {category}: {', '.join(ids[:MAX_IDS_IN_DESCRIPTION])}{more}")
    lines += [
        "",
        (
            "Items in scope and not approved are rejected; error items are never published. "
            f"CLI: `retouch review approve {run_id} --all-passing --reviewer NAME`."
        ),
    ]
    return "\n".join(lines)


def _tag_flow_run(run_id: str) -> None:
    """Tag the current flow run `run:<run_id>` so `retouch review` finds it by the catalogue run id."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    tag = RUN_TAG_PREFIX + run_id
    if tag in (ctx.flow_run.tags or []):
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(ctx.flow_run.id)
        client.update_flow_run(ctx.flow_run.id, tags=[*current.tags, tag])


def _under_deployment() -> bool:
    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


def _wait_for_decision(
    round_no: int, description: str, config: ReviewConfig, remaining_s: int
) -> ReviewDecision | None:
    """One gate round; None when the deadline passed without a decision."""
    form = ReviewDecision.with_initial_data(description=description)
    key = f"review-{round_no}"
    if _under_deployment():
        # Suspend ends this process; a resume re-runs the flow and this call returns the stored
        # input for the same key. The server fails the run if nobody resumes before the timeout.
        return suspend_flow_run(wait_for_input=form, timeout=remaining_s, key=key)
    try:
        return pause_flow_run(
            wait_for_input=form,
            timeout=remaining_s,
            poll_interval=min(config.poll_interval_s, remaining_s),
            key=key,
        )
    except FlowPauseTimeout:
        _resume_after_timeout()
        return None


def _stored_decision(round_no: int) -> ReviewDecision | None:
    """The decision a round already received, for a run re-executed after its deadline.

    A suspended run resumed just before the deadline may start again after it; the reviewer's answer
    is stored under the round's key and must win over expiry.
    """
    for state_name in ("suspended", "paused"):
        value = read_flow_run_input(keyset_from_base_key(f"{state_name}-review-{round_no}")["response"])
        if value:
            return ReviewDecision(**value)
    return None


def _resume_after_timeout() -> None:
    """Move the timed-out run back to Running so it can record the expiry and end Completed.

    The server rejects every transition out of an expired pause with Failed("never resumed"); a
    review nobody answered is an outcome, not a failure, so the flow forces the transition.
    """
    ctx = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(ctx.flow_run.id, Running(message="Review timed out"), force=True)


def _apply(
    store_uri: str, run_id: str, partitions: list[str], outcome: str, decision: dict | None, reviewed_at: str
) -> dict:
    """Decide and publish partition by partition; returns summed publish counts."""
    reviewer = (decision or {}).get("reviewer")
    futures = []
    for partition in partitions:
        verdicts = decide_partition(store_uri, run_id, partition, outcome, decision)
        futures.append(
            publish_partition.submit(store_uri, run_id, partition, verdicts, reviewer, reviewed_at)
        )
    return _add(*(f.result() for f in futures))


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


def gate_key(run_id: str) -> str:
    return join_key("review", f"run={run_id}", "gate.json")


def decision_key(run_id: str, flow_run_id: str, round_no: int) -> str:
    return join_key("review", f"run={run_id}", "decisions", f"{flow_run_id}-{round_no:03d}.json")


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
    prefix = join_key("review", f"run={run_id}", "decisions") + "/"
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


def review_and_publish(store_uri: str, run_id: str, config: ReviewConfig) -> dict:
    """Gate the run's pending manifest rows and publish what is approved; returns a summary.

    The run always ends cleanly: a timeout marks the pending rows `expired` and publishes nothing.
    """
    logger = get_run_logger()
    summary = summarise_pending(store_uri, run_id)
    result: dict = {"run_id": run_id, "policy": config.policy, "reviewers": [], "comments": []}
    published: dict[str, int] = {}
    outcome = "decided"
    if summary["total"] == 0:
        outcome = "nothing_pending"
    elif config.policy == "auto_approve_passing":
        decision = {"reviewer": AUTO_REVIEWER, "approve_all_passing": True}
        published = _apply(
            store_uri, run_id, summary["partitions"], "decision", decision, datetime.now(UTC).isoformat()
        )
        result["reviewers"].append(AUTO_REVIEWER)
    else:
        _tag_flow_run(run_id)
        deadline = review_deadline(store_uri, run_id, config.timeout_s)
        # A run killed while publishing left rows pending that a reviewer already decided.
        for record in recorded_decisions(store_uri, run_id):
            if summary["total"] == 0:
                break
            decision = record["decision"]
            logger.info("run %s: replaying the decision by %s of %s", run_id, decision["reviewer"],
                        record["decided_at"])
            replayed = _apply(store_uri, run_id, summary["partitions"], "decision", decision, record["decided_at"])
            published = _add(published, replayed)
            summary = summarise_pending(store_uri, run_id)
        round_no = 0
        while summary["total"] > 0:
            round_no += 1
            remaining = int((deadline - datetime.now(UTC)).total_seconds())
            description = describe(store_uri, run_id, summary, deadline=deadline)
            create_markdown_artifact(markdown=description, key=_artifact_key(run_id), description="Review")
            if remaining > 0:
                decision = _wait_for_decision(round_no, description, config, remaining)
            else:
                decision = _stored_decision(round_no)
            if decision is None:
                logger.warning("run %s: review timed out; %d items expire", run_id, summary["total"])
                _apply(store_uri, run_id, summary["partitions"], "timeout", None, datetime.now(UTC).isoformat())
                outcome = "expired"
                break
            logger.info("run %s: decision by %s: %s", run_id, decision.reviewer, decision.comment)
            pending_ids = set(pending_rows(store_uri, run_id)["image_id"].astype(str))
            if unknown := sorted({*decision.approve_ids, *decision.reject_ids} - pending_ids):
                # The UI form cannot check ids against the manifest; the CLI refuses them up front.
                logger.warning("run %s: the decision by %s names ids that are not pending (ignored): %s",
                               run_id, decision.reviewer, ", ".join(unknown))
            record = record_decision(store_uri, run_id, round_no, decision.model_dump(mode="json"))
            decided = _apply(
                store_uri, run_id, summary["partitions"], "decision", record["decision"], record["decided_at"]
            )
            published = _add(published, decided)
            summary = summarise_pending(store_uri, run_id)
        decisions = [ReviewDecision(**r["decision"]) for r in recorded_decisions(store_uri, run_id)]
        result["reviewers"] = [d.reviewer for d in decisions]
        result["comments"] = [d.comment for d in decisions if d.comment]
    statuses = review_status_counts(store_uri, run_id)
    logger.info("run %s: review %s; statuses %s; published %s", run_id, outcome, statuses, published)
    return {**result, "outcome": outcome, "review_status": statuses, "published": published}


def review_status_counts(store_uri: str, run_id: str) -> dict[str, int]:
    manifest = read_manifest(open_store(store_uri), run_id)
    if manifest.empty:
        return {}
    return {str(k): int(v) for k, v in manifest["review_status"].value_counts().items()}


def expire_overdue_reviews(store_uri: str, now: datetime | None = None) -> dict[str, list[str]]:
    """Mark pending rows `expired` for every run whose review deadline has passed.

    A suspended run that nobody resumes is failed by the Prefect server at the deadline, with no
    process left to update the manifest; this sweep records the outcome (hourly as the
    `expire-reviews/hourly` deployment, or `retouch review expire STORE`). Nothing is published.
    A run that still has a flow run scheduled or running is left alone: it was resumed in time and
    will apply its decision itself. Returns the run ids `expired` and `still_running`.
    """
    store = open_store(store_uri)
    now = now or datetime.now(UTC)
    swept: dict[str, list[str]] = {"expired": [], "still_running": []}
    for key in store.list("review/"):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "gate.json" or not parts[1].startswith("run="):
            continue
        run_id = parts[1][len("run=") :]
        try:
            deadline = datetime.fromisoformat(json.loads(store.get_bytes(key))["deadline"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"run {run_id}: unreadable review gate {store.uri_for(key)}: {exc}") from None
        if deadline > now:
            continue
        rows = pending_rows(store_uri, run_id)
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
        tags=FlowRunFilterTags(all_=[RUN_TAG_PREFIX + run_id]),
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


def _add(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _artifact_key(run_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "review-" + "".join(c if c.isalnum() else "-" for c in run_id.lower())
