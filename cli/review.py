"""`retouch review`: see what waits for a decision and resume the paused run with one.

The catalogue run id is what people know (it names the edited/ and manifest/ keys), so commands take
it and find the paused Prefect flow run by its `run:<run_id>` tag, which `review_and_publish` sets
before pausing. The decision is validated here with the same `ReviewDecision` model the server
checks, so a missing reviewer is refused before anything is sent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import resume_flow_run
from pydantic import ValidationError

from flows.expire import expire_overdue_reviews
from storage.run_layout import contact_sheet_key
from storage.store import open_store
from tasks.params import ReviewDecision
from tasks.report import MAX_IDS_IN_DESCRIPTION
from tasks.review import RUN_TAG_PREFIX, pending_rows, run_tag, summarise, verdicts_for

review_app = typer.Typer(help="Human review of a refresh run: list what waits, approve, reject.")


class ReviewCliError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _paused_runs(tags: list[str] | None = None) -> list[FlowRun]:
    flow_run_filter = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
        tags=FlowRunFilterTags(all_=tags) if tags else None,
    )
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=flow_run_filter)


def run_id_of(flow_run: FlowRun) -> str | None:
    """The catalogue run id a flow run reviews, from its `run:<run_id>` tag."""
    return next((t[len(RUN_TAG_PREFIX) :] for t in flow_run.tags if t.startswith(RUN_TAG_PREFIX)), None)


def store_uri_of(flow_run: FlowRun) -> str | None:
    """Where the run writes its manifest: `config.output_uri`, else `config.store_uri`."""
    config = flow_run.parameters.get("config") or {}
    return config.get("output_uri") or config.get("store_uri") if isinstance(config, dict) else None


def find_paused_flow_run(run_id: str) -> FlowRun:
    """The one paused flow run reviewing `run_id`; a clear error for none or several."""
    runs = _paused_runs([run_tag(run_id)])
    if not runs:
        raise ReviewCliError(
            f"no paused flow run is waiting for review of run {run_id!r}; `retouch review list` shows "
            "the runs that are (a run that timed out cannot be resumed)"
        )
    if len(runs) > 1:
        ids = ", ".join(str(r.id) for r in runs)
        raise ReviewCliError(f"several paused flow runs review run {run_id!r} ({ids}); resume one in the UI")
    return runs[0]


def _split_ids(values: list[str] | None) -> list[str]:
    """`--ids a --ids b,c` -> [a, b, c]."""
    return [i.strip() for v in values or [] for i in v.split(",") if i.strip()]


def _decide(run_id: str, decision: dict, store: str | None) -> None:
    try:
        checked = ReviewDecision(**decision)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ReviewCliError(f"decision refused: {problems}") from None
    flow_run = find_paused_flow_run(run_id)
    store_uri = store or store_uri_of(flow_run)
    if store_uri:
        pending = pending_rows(store_uri, run_id)
        # A mistyped id would not be approved, and the item it meant would be rejected with the rest.
        named = dict.fromkeys([*checked.approve_ids, *checked.reject_ids])
        not_pending = [i for i in named if i not in set(pending["image_id"].astype(str))]
        if not_pending:
            raise ReviewCliError(
                f"run {run_id} has no pending item {', '.join(not_pending)} (unknown id or already decided); "
                "nothing was sent"
            )
        verdicts = verdicts_for(
            pending,
            outcome="decision",
            approve_all_passing=checked.approve_all_passing,
            approve_ids=checked.approve_ids,
            reject_ids=checked.reject_ids,
            categories=checked.categories,
        )
        approved = sum(v == "approved" for v in verdicts.values())
        typer.echo(f"run {run_id}: {approved} to approve, {len(verdicts) - approved} to reject")
    try:
        resume_flow_run(flow_run.id, run_input=checked.model_dump(mode="json"))
    except (NotPausedError, FlowPauseTimeout) as exc:
        raise ReviewCliError(f"flow run {flow_run.id} can no longer be resumed: {exc}") from None
    except RuntimeError as exc:
        raise ReviewCliError(str(exc)) from None
    typer.echo(f"resumed flow run {flow_run.name} ({flow_run.id}) with the decision of {checked.reviewer}")


def _run(fn, *args) -> None:
    try:
        fn(*args)
    except ReviewCliError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@review_app.command("list")
def list_cmd(
    store: Annotated[str | None, typer.Option(help="Manifest root; default: the flow run's config.")] = None,
    link_expiry: Annotated[
        int, typer.Option(help="Seconds the printed contact-sheet links stay valid.", min=60, max=7 * 24 * 3600)
    ] = 3600,
) -> None:
    """Paused runs and what waits in each: counts per category and QC status, with fresh contact-sheet
    links (presigned now, valid --link-expiry seconds)."""
    runs = [r for r in _paused_runs() if run_id_of(r)]
    if not runs:
        typer.echo("no run is waiting for review")
    for flow_run in runs:
        run_id = run_id_of(flow_run)
        timeout = flow_run.state.state_details.pause_timeout if flow_run.state else None
        until = f", expires {timeout:%Y-%m-%d %H:%M} UTC" if timeout else ""
        typer.echo(f"{run_id}  flow run {flow_run.name} ({flow_run.id}){until}")
        store_uri = store or store_uri_of(flow_run)
        if not store_uri:
            continue
        summary = summarise(pending_rows(store_uri, run_id))
        out = open_store(store_uri)
        for category, counts in sorted(summary["by_category"].items()):
            figures = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            typer.echo(f"  {category}: {figures}")
            sheet = contact_sheet_key(run_id, category)
            if out.exists(sheet):
                typer.echo(f"    contact sheet: {out.presigned_url(sheet, expires_s=link_expiry)}")
            flagged = summary["flagged_ids"].get(category, [])
            if flagged:
                more = f" and {len(flagged) - MAX_IDS_IN_DESCRIPTION} more" if len(flagged) > MAX_IDS_IN_DESCRIPTION else ""
                typer.echo(f"    flagged or failed: {', '.join(flagged[:MAX_IDS_IN_DESCRIPTION])}{more}")


@review_app.command("approve")
def approve_cmd(
    run_id: Annotated[str, typer.Argument(help="The catalogue run id (as in manifest/run=<run_id>/).")],
    reviewer: Annotated[str, typer.Option("--reviewer", help="Your name; recorded on every manifest row.")],
    ids: Annotated[
        list[str] | None, typer.Option("--ids", help="Image ids to approve (repeat or comma-separate).")
    ] = None,
    all_passing: Annotated[
        bool, typer.Option("--all-passing", help="Approve every item that passed QC.")
    ] = False,
    category: Annotated[
        list[str] | None,
        typer.Option("--category", help="Decide only these categories; the others keep waiting."),
    ] = None,
    comment: Annotated[str, typer.Option(help="Free text for the run's log.")] = "",
    store: Annotated[
        str | None, typer.Option(help="Manifest root for the preview; default: the run's config.")
    ] = None,
) -> None:
    """Approve QC-passing items and/or listed ids; every other item in scope is rejected."""
    approve_ids = _split_ids(ids)
    if not approve_ids and not all_passing:
        typer.echo("error: say what to approve: --all-passing and/or --ids", err=True)
        raise typer.Exit(2)
    decision = {
        "reviewer": reviewer,
        "approve_all_passing": all_passing,
        "approve_ids": approve_ids,
        "categories": category or None,
        "comment": comment,
    }
    _run(_decide, run_id, decision, store)


@review_app.command("reject")
def reject_cmd(
    run_id: Annotated[str, typer.Argument(help="The catalogue run id (as in manifest/run=<run_id>/).")],
    reviewer: Annotated[str, typer.Option("--reviewer", help="Your name; recorded on every manifest row.")],
    ids: Annotated[
        list[str] | None,
        typer.Option("--ids", help="Image ids to reject; without --ids every item in scope is rejected."),
    ] = None,
    category: Annotated[
        list[str] | None,
        typer.Option("--category", help="Decide only these categories; the others keep waiting."),
    ] = None,
    comment: Annotated[str, typer.Option(help="Free text for the run's log.")] = "",
    store: Annotated[
        str | None, typer.Option(help="Manifest root for the preview; default: the run's config.")
    ] = None,
) -> None:
    """Reject listed ids (the rest keep waiting), or everything in scope when no ids are given."""
    reject_ids = _split_ids(ids)
    # With ids and no --category the scope is empty: only the listed ids are decided.
    scope = category or ([] if reject_ids else None)
    decision = {"reviewer": reviewer, "reject_ids": reject_ids, "categories": scope, "comment": comment}
    _run(_decide, run_id, decision, store)


@review_app.command("expire")
def expire_cmd(
    store: Annotated[str, typer.Argument(help="Manifest root (local path or s3://bucket/prefix).")],
) -> None:
    """Record `expired` for runs whose review deadline passed (suspended runs the server timed out)."""
    try:
        swept = expire_overdue_reviews(store, datetime.now(UTC))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"expired pending items of {len(swept['expired'])} run(s): {', '.join(swept['expired']) or '-'}")
    if swept["still_running"]:
        typer.echo(f"past the deadline but still running (left alone): {', '.join(swept['still_running'])}")


def register(app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
