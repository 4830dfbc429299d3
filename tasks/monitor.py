"""The end of every run, for the people who watch it: the run's rows of the analytics tables
(storage.run_table), the run table's row as a Prefect table artifact under one stable key (the
Artifacts page then lists every night as a version), and a `catalogue.refresh.completed` event with
the run's counts and rates, which Prefect Automations can act on (README, "Monitoring").

Rows are built from the run's manifest, not from the summary alone: the manifest is what a later
query would see, and it survives a resumed run whose cached stages report near-zero timings. So
throughput comes from the manifest too: edited images over the wall time from the first item's
start to the last item's end.

Review wait is first pause to decision. The gate fixes its deadline in `gate.json` on first pause;
`opened_at` in the same record is that moment. Runs whose gate did not record it (and runs with no
human gate) get a null wait.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from storage.manifest import QC_STATUSES, REVIEW_STATUSES, read_manifest
from storage.run_layout import contact_sheet_key, gate_key
from storage.run_table import (
    read_run_category_table,
    read_run_table,
    write_run_category_table,
    write_run_table,
)
from storage.store import NotFoundError, Store, open_store

EVENT = "catalogue.refresh.completed"
ARTIFACT_KEY = "catalogue-run-table"
JUMP_LABEL = "catalogue.flag-rate-jump"
# A category's flag rate "jumps" when it exceeds the median of its previous nights by this much.
FLAG_RATE_JUMP = 0.10
BASELINE_NIGHTS = 14
_DECIDED = ("approved", "rejected")


@task(retries=2, retry_delay_seconds=[2, 10])
def record_run(output_uri: str, run_id: str, summary: dict, instructions: dict[str, dict],
               flag_rate_jump: float = FLAG_RATE_JUMP) -> dict:
    """Write the run's analytics rows, publish the artifact, emit the event; returns the event payload.

    `summary` is flows.refresh.run_summary's dict, `instructions` the learn step's records (category ->
    record, with `route` once the photometric route exists).
    """
    store = open_store(output_uri)
    # 1. the analytics tables, from what the run left behind
    run_row, category_rows = write_run_rows(store, run_id, summary, instructions, flow_run_fields())
    # 2. compare with the previous nights, then tell Prefect
    jumped = flag_rate_jumps(read_run_table(store).to_pandas(), read_run_category_table(store).to_pandas(),
                             run_id, flag_rate_jump)
    payload = event_payload(run_row, category_rows, jumped)
    create_table_artifact(table=[artifact_row(run_row)], key=ARTIFACT_KEY,
                          description=f"Run table row of catalogue run {run_id}; earlier nights are "
                                      "the earlier versions of this artifact.")
    emit_event(event=EVENT, resource={"prefect.resource.id": f"catalogue.run.{run_id}",
                                      "prefect.resource.name": run_id,
                                      JUMP_LABEL: "true" if jumped else "false"},
               payload=payload)
    return payload


def write_run_rows(store: Store, run_id: str, summary: dict, instructions: dict[str, dict],
                   flow_fields: dict[str, Any]) -> tuple[dict, list[dict]]:
    """Build the run's row and category rows from its manifest and summary, write both; returns them."""
    manifest = read_manifest(store, run_id)
    opened_at = review_opened_at(store, run_id)
    run_row = build_run_row(run_id, summary, instructions, manifest, opened_at, **flow_fields)
    category_rows = build_category_rows(store, run_id, summary, instructions, manifest, opened_at)
    write_run_table(store, run_row)
    write_run_category_table(store, run_id, category_rows)
    return run_row, category_rows


def flow_run_fields() -> dict[str, Any]:
    """The enclosing flow run's id, UI link and scheduled start (outside a flow run: none)."""
    if not flow_run.id:
        return {"flow_run_id": None, "flow_run_url": None, "scheduled_at": None}
    # Without PREFECT_UI_URL (an embedded server) Prefect still builds a link, starting "None/".
    url = flow_run.ui_url
    return {"flow_run_id": str(flow_run.id), "flow_run_url": url if url and url.startswith("http") else None,
            "scheduled_at": flow_run.scheduled_start_time.astimezone(UTC)}


def review_opened_at(store: Store, run_id: str) -> datetime | None:
    """When the run's review gate first paused (`opened_at` in gate.json), if it recorded it."""
    try:
        gate = json.loads(store.get_bytes(gate_key(run_id)))
    except NotFoundError:
        return None
    opened = gate.get("opened_at")
    return datetime.fromisoformat(opened).astimezone(UTC) if opened else None


def status_counts(rows: pd.DataFrame) -> dict[str, int]:
    """items, qc_<status> and review_<status> counts, plus items published."""
    counts = {"items": len(rows)}
    qc, review = rows["qc_status"].value_counts(), rows["review_status"].value_counts()
    counts |= {f"qc_{s}": int(qc.get(s, 0)) for s in QC_STATUSES}
    counts |= {f"review_{s}": int(review.get(s, 0)) for s in REVIEW_STATUSES}
    counts["published"] = int(rows["published_uri"].notna().sum())
    return counts


def review_times(rows: pd.DataFrame, opened_at: datetime | None) -> dict[str, Any]:
    """The last decision on these rows and its wait since the gate first paused (expiry is no decision)."""
    decided = rows.loc[rows["review_status"].isin(_DECIDED), "reviewed_at"].dropna()
    decided_at = decided.max().to_pydatetime() if len(decided) else None
    wait = (decided_at - opened_at).total_seconds() if decided_at and opened_at else None
    return {"review_decided_at": decided_at, "review_wait_s": wait}


def edit_throughput(rows: pd.DataFrame) -> dict[str, Any]:
    """Edited images over the wall time from the first item's start to the last item's end."""
    edited = rows[rows["output_uri"].notna()]
    timed = edited.dropna(subset=["duration_s"])
    if timed.empty:
        return {"images_edited": len(edited), "edit_wall_s": None, "images_per_s": None}
    starts = timed["created_at"] - pd.to_timedelta(timed["duration_s"], unit="s")
    wall = (timed["created_at"].max() - starts.min()).total_seconds()
    return {"images_edited": len(edited), "edit_wall_s": round(wall, 3),
            "images_per_s": round(len(edited) / wall, 4) if wall > 0 else None}


def instruction_status(record: dict | None) -> str:
    if record is None:
        return "none"
    if record.get("status") != "ok":
        return "failed"
    return "learned" if record.get("learned") else "reused"


def build_run_row(run_id: str, summary: dict, instructions: dict[str, dict], manifest: pd.DataFrame,
                  opened_at: datetime | None, *, flow_run_id: str | None, flow_run_url: str | None,
                  scheduled_at: datetime | None) -> dict[str, Any]:
    """The run table's row (storage.run_table.RUN_TABLE_SCHEMA)."""
    finished_at = datetime.now(UTC)
    review, timings = summary.get("review", {}), summary.get("timings_s", {})
    published, partitions = review.get("published", {}), summary["partitions"]
    statuses = [instruction_status(r) for r in instructions.values()]
    routes = sorted({r["route"] for r in instructions.values() if r.get("route")})
    return {
        "run_id": run_id, "flow_run_id": flow_run_id, "flow_run_url": flow_run_url,
        "scheduled_at": scheduled_at or finished_at, "finished_at": finished_at,
        **status_counts(manifest),
        **{f"published_{k}": int(published.get(k, 0)) for k in ("created", "replaced", "unchanged")},
        "partitions": partitions["total"], "partitions_edited": partitions["done"],
        "partitions_skipped": partitions["skipped"],
        **{f"instructions_{s}": statuses.count(s) for s in ("learned", "reused", "failed")},
        "instruction_routes": routes or None,
        "review_policy": review.get("policy"), "review_outcome": review.get("outcome"),
        "reviewers": list(dict.fromkeys(review.get("reviewers", []))),
        "review_opened_at": opened_at, **review_times(manifest, opened_at),
        **edit_throughput(manifest),
        **{f"{stage}_s": timings.get(stage) for stage in ("ingest", "learn", "edit", "report", "review", "total")},
        "timings": json.dumps(timings, sort_keys=True),
    }


def build_category_rows(store: Store, run_id: str, summary: dict, instructions: dict[str, dict],
                        manifest: pd.DataFrame, opened_at: datetime | None) -> list[dict[str, Any]]:
    """The run's rows of the per-category table (storage.run_table.RUN_CATEGORY_SCHEMA)."""
    categories = sorted({*manifest["category"].astype(str), *summary.get("categories", {})})
    rows = []
    for category in categories:
        items = manifest[manifest["category"] == category]
        errors = items["error_code"].dropna().value_counts()
        record = instructions.get(category)
        sheet = contact_sheet_key(run_id, category)
        rows.append({
            "run_id": run_id, "category": category, **status_counts(items),
            "error_codes": [{"error_code": str(code), "items": int(n)} for code, n in sorted(errors.items())],
            **{f"{name}_mean": _mean(items[name]) for name in
               ("qc_ssim_structure", "qc_edit_strength", "qc_direction_agreement")},
            "instruction_status": instruction_status(record),
            "instruction_route": (record or {}).get("route"),
            "instruction_id": (record or {}).get("cache_key"),
            **review_times(items, opened_at),
            "contact_sheet_uri": store.uri_for(sheet) if store.exists(sheet) else None,
        })
    return rows


def _mean(values: pd.Series) -> float | None:
    values = values.dropna()
    return round(float(values.mean()), 6) if len(values) else None


def flag_rate_jumps(runs: pd.DataFrame, categories: pd.DataFrame, run_id: str, threshold: float) -> dict:
    """Categories whose flag rate tonight exceeds the median of their previous nights by `threshold`.

    Returns category -> {"flag_rate", "baseline"}; a category with no previous night never jumps.
    """
    order = runs.sort_values("scheduled_at")["run_id"].tolist()
    if run_id not in order:
        return {}
    previous = order[max(0, order.index(run_id) - BASELINE_NIGHTS) : order.index(run_id)]
    rates = categories.assign(flag_rate=categories["qc_flag"] / categories["items"].where(categories["items"] > 0))
    tonight = rates[rates["run_id"] == run_id].set_index("category")["flag_rate"]
    baseline = rates[rates["run_id"].isin(previous)].groupby("category")["flag_rate"].median()
    jumped = {}
    for category, rate in tonight.dropna().items():
        base = baseline.get(category)
        # rounded: 0.3 - 0.2 is 0.0999... in floating point, and must count as a jump of 0.1
        if base is not None and not pd.isna(base) and round(rate - base, 9) >= threshold:
            jumped[str(category)] = {"flag_rate": round(float(rate), 4), "baseline": round(float(base), 4)}
    return jumped


def _rate(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def event_payload(run_row: dict, category_rows: list[dict], jumped: dict) -> dict:
    """Counts and rates, small and JSON-able: what an Automation's message template can quote."""
    items = run_row["items"]
    return {
        "run_id": run_row["run_id"],
        "items": items,
        "qc": {s: run_row[f"qc_{s}"] for s in QC_STATUSES},
        "rates": {f"{s}_rate": _rate(run_row[f"qc_{s}"], items) for s in QC_STATUSES},
        "review": {**{s: run_row[f"review_{s}"] for s in REVIEW_STATUSES},
                   "outcome": run_row["review_outcome"], "wait_s": run_row["review_wait_s"],
                   "reviewers": run_row["reviewers"]},
        "published": run_row["published"],
        "images_per_s": run_row["images_per_s"],
        "instructions": {s: run_row[f"instructions_{s}"] for s in ("learned", "reused", "failed")},
        "categories": {r["category"]: {"items": r["items"], "flag_rate": _rate(r["qc_flag"], r["items"]),
                                       "error_rate": _rate(r["qc_error"], r["items"])} for r in category_rows},
        "flag_rate_jumped": jumped,
    }


def artifact_row(run_row: dict) -> dict:
    """The run row as a table artifact row: timestamps as ISO strings, lists joined."""
    out = {}
    for name, value in run_row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, list):
            value = ", ".join(value)
        out[name] = value
    return out
