"""The review gate: QC flags, people decide, and only approved outputs reach the catalogue.

`review_and_publish` runs inside `catalogue_refresh` (flow level: Prefect cannot pause a task). It
asks for a `ReviewDecision` until every pending row has a verdict or the deadline passes, then
publishes per partition. Under a deployment it suspends instead of pausing, so no worker waits
overnight; on resume the flow re-runs from the top, the upstream work comes back cached, and the
rows already decided stay decided.

Every decision is written to the store (`review/run=<run_id>/decisions/`), signed and with the
exact rows it decided, before anything is published, so a process killed while publishing loses
nothing: the next run of the same run id replays the signed records onto those rows, if still
pending, before it asks anyone again. Records it cannot trust are refused and named (log, summary).

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
from pydantic import ValidationError

from tasks.decisions import record_decision, recorded_decisions, review_deadline
from tasks.params import ReviewConfig, ReviewDecision
from tasks.publish import publish_partition
from tasks.report import artifact_key, describe
from tasks.review import (
    AUTO_REVIEWER,
    add_counts,
    covered_rows,
    decide,
    pending_rows,
    review_status_counts,
    row_versions,
    run_tag,
    summarise_pending,
)


class ReviewPolicyError(ValueError):
    """A run asks for a review policy its deployment does not allow."""


def check_review_policy(config: ReviewConfig) -> None:
    """Refuse auto-approval asked by a run of a deployment whose own policy is human review.

    Whoever can start a run can set its parameters; only whoever can edit the deployment can change
    its default `config.review.policy` (absent: `human`). Runs outside a deployment (the demo, `retouch
    refresh`) are started by someone who can write to the store anyway and keep their parameter.
    """
    ctx = FlowRunContext.get()
    if config.policy == "human" or not (ctx and ctx.flow_run and ctx.flow_run.deployment_id):
        return
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(ctx.flow_run.deployment_id)
    fixed = (((deployment.parameters or {}).get("config") or {}).get("review") or {}).get("policy", "human")
    if fixed != config.policy:
        raise ReviewPolicyError(
            f"this run asks for review.policy={config.policy!r}, but deployment {deployment.name!r} fixes "
            f"{fixed!r}; change the deployment (not the run) to review differently"
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


def _publish(store_uri: str, run_id: str, verdicts: dict[str, dict[str, str]], reviewer: str | None,
             reviewed_at: str) -> dict:
    """Publish and record partition by partition; returns summed publish counts."""
    futures = [publish_partition.submit(store_uri, run_id, partition, part, reviewer, reviewed_at)
               for partition, part in verdicts.items() if part]
    return add_counts(*(f.result() for f in futures))


def _apply_record(store_uri: str, run_id: str, record: dict) -> dict:
    """Apply a recorded decision to the rows it decided that are still pending, and no others."""
    rows = covered_rows(pending_rows(store_uri, run_id), record["items"])
    decision = ReviewDecision(**record["decision"])
    return _publish(store_uri, run_id, decide(rows, "decision", record["decision"]), decision.reviewer,
                    record["decided_at"])


def _report_refused(run_id: str, refused: list[dict], result: dict) -> None:
    logger = get_run_logger()
    for record in refused:
        if record not in result["refused_records"]:
            logger.warning("run %s: refused review record %s: %s", run_id, record["uri"], record["reason"])
            result["refused_records"].append(record)


def review_and_publish(store_uri: str, run_id: str, config: ReviewConfig) -> dict:
    """Gate the run's pending manifest rows and publish what is approved; returns a summary.

    The run always ends cleanly: a timeout marks the pending rows `expired` and publishes nothing.
    """
    logger = get_run_logger()
    check_review_policy(config)
    summary = summarise_pending(store_uri, run_id)
    result: dict = {"run_id": run_id, "policy": config.policy, "reviewers": [], "comments": [],
                    "refused_records": []}
    published: dict[str, int] = {}
    outcome = "decided"
    if summary["total"] == 0:
        outcome = "nothing_pending"
    elif config.policy == "auto_approve_passing":
        decision = {"reviewer": AUTO_REVIEWER, "approve_all_passing": True}
        verdicts = decide(pending_rows(store_uri, run_id), "decision", decision)
        published = _publish(store_uri, run_id, verdicts, AUTO_REVIEWER, datetime.now(UTC).isoformat())
        result["reviewers"].append(AUTO_REVIEWER)
    else:
        _tag_flow_run(run_id)
        deadline = review_deadline(store_uri, run_id, config.timeout_s, row_versions(pending_rows(store_uri, run_id)))
        applied: dict[tuple[str, int], dict] = {}
        # A run killed while publishing left rows pending that a reviewer already decided.
        records, refused = recorded_decisions(store_uri, run_id)
        _report_refused(run_id, refused, result)
        for record in records:
            if summary["total"] == 0:
                break
            logger.info("run %s: replaying the decision by %r of %s (%d items)", run_id,
                        record["decision"]["reviewer"], record["decided_at"], len(record["items"]))
            published = add_counts(published, _apply_record(store_uri, run_id, record))
            applied[record["flow_run_id"], record["round"]] = record
            summary = summarise_pending(store_uri, run_id)
        round_no = 0
        while summary["total"] > 0:
            round_no += 1
            pending = pending_rows(store_uri, run_id)
            shown = row_versions(pending)
            remaining = int((deadline - datetime.now(UTC)).total_seconds())
            description = describe(store_uri, run_id, summary, deadline=deadline, link_expiry_s=config.link_expiry_s)
            create_markdown_artifact(markdown=description, key=artifact_key("review", run_id), description="Review")
            try:
                if remaining > 0:
                    get_run_logger().info(
                        "run %s: waiting for review (round %d, %d s left): retouch review list; "
                        "retouch review approve %s --reviewer NAME --all-passing (or --ids ID,...)",
                        run_id, round_no, remaining, run_id)
                    decision = _wait_for_decision(round_no, description, config, remaining)
                else:
                    decision = _stored_decision(round_no)
            except ValidationError as exc:
                # Past the form's schema (checked by the server) but not the reviewer rules: ask again.
                logger.warning("run %s: round %d: decision refused (%s); asking again", run_id, round_no,
                               "; ".join(e["msg"] for e in exc.errors()))
                continue
            if decision is None:
                logger.warning("run %s: review timed out; %d items expire", run_id, summary["total"])
                _publish(store_uri, run_id, decide(pending, "timeout", None), None, datetime.now(UTC).isoformat())
                outcome = "expired"
                break
            logger.info("run %s: decision by %r: %r", run_id, decision.reviewer, decision.comment)
            if unknown := sorted({*decision.approve_ids, *decision.reject_ids} - set(shown)):
                # The UI form cannot check ids against the manifest; the CLI refuses them up front.
                logger.warning("run %s: the decision by %r names ids that are not pending (ignored): %r",
                               run_id, decision.reviewer, unknown)
            fields = decision.model_dump(mode="json")
            decided = {i for part in decide(covered_rows(pending, shown), "decision", fields).values() for i in part}
            record, refused = record_decision(store_uri, run_id, round_no, fields,
                                              {i: shown[i] for i in sorted(decided)})
            _report_refused(run_id, refused, result)
            published = add_counts(published, _apply_record(store_uri, run_id, record))
            applied[record["flow_run_id"], record["round"]] = record
            summary = summarise_pending(store_uri, run_id)
        decisions = [ReviewDecision(**r["decision"]) for r in sorted(applied.values(), key=lambda r: r["decided_at"])]
        result["reviewers"] = [d.reviewer for d in decisions]
        result["comments"] = [d.comment for d in decisions if d.comment]
    statuses = review_status_counts(store_uri, run_id)
    logger.info("run %s: review %s; statuses %s; published %s", run_id, outcome, statuses, published)
    return {**result, "outcome": outcome, "review_status": statuses, "published": published}


