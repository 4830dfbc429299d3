"""The review gate: QC flags, people decide, and only approved outputs reach the catalogue.

`review_and_publish` runs inside `catalogue_refresh` (flow level: Prefect cannot pause a task). It
asks for a `ReviewDecision` until every pending row has a verdict or the deadline passes, then
publishes per partition. Under a deployment it suspends instead of pausing, so no worker waits
overnight; on resume the flow re-runs from the top, the upstream work comes back cached, and the
rows already decided stay decided.

Every decision is written to the store (`review/run=<run_id>/decisions/`) before anything is
published, so a process killed while publishing loses nothing: the next run of the same run id
replays the recorded decisions onto the rows still pending before it asks anyone again.

Runs nobody answers are swept by `flows.expire` (hourly, deployments/prefect.yaml).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input.actions import read_flow_run_input
from prefect.input.run_input import keyset_from_base_key
from prefect.states import Running

from tasks.decisions import record_decision, recorded_decisions, review_deadline
from tasks.params import ReviewConfig, ReviewDecision
from tasks.publish import publish_partition
from tasks.report import artifact_key, describe
from tasks.review import (
    AUTO_REVIEWER,
    add_counts,
    decide_partition,
    pending_rows,
    review_status_counts,
    run_tag,
    summarise_pending,
)


def _tag_flow_run(run_id: str) -> None:
    """Tag the current flow run `run:<run_id>` so `retouch review` finds it by the catalogue run id."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    tag = run_tag(run_id)
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
    return add_counts(*(f.result() for f in futures))


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
            published = add_counts(published, replayed)
            summary = summarise_pending(store_uri, run_id)
        round_no = 0
        while summary["total"] > 0:
            round_no += 1
            remaining = int((deadline - datetime.now(UTC)).total_seconds())
            description = describe(store_uri, run_id, summary, deadline=deadline)
            create_markdown_artifact(markdown=description, key=artifact_key("review", run_id), description="Review")
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
            published = add_counts(published, decided)
            summary = summarise_pending(store_uri, run_id)
        decisions = [ReviewDecision(**r["decision"]) for r in recorded_decisions(store_uri, run_id)]
        result["reviewers"] = [d.reviewer for d in decisions]
        result["comments"] = [d.comment for d in decisions if d.comment]
    statuses = review_status_counts(store_uri, run_id)
    logger.info("run %s: review %s; statuses %s; published %s", run_id, outcome, statuses, published)
    return {**result, "outcome": outcome, "review_status": statuses, "published": published}


