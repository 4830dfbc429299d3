"""Review tasks: what waits for a decision, and which verdict each manifest row gets.

The verdict rules live in one pure function (`verdicts_for`) so the flow, the CLI preview and the
tests agree on them. Tasks only read the manifest and return small dicts; the manifest is rewritten
by `tasks.publish.publish_partition`, after the approved outputs are copied.

The tasks are never cached (`NO_CACHE`), even where results are persisted by default: the same call
with the same arguments returns a different answer after every decision, and a stale summary would
make the gate ask again for rows already decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.manifest import read_manifest
from storage.store import open_store

PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"
EXPIRED = "expired"

AUTO_REVIEWER = "auto:qc-pass"
RUN_TAG_PREFIX = "run:"


def run_tag(run_id: str) -> str:
    """The Prefect tag on every flow run of a catalogue run, so `retouch review` finds them by run id."""
    return RUN_TAG_PREFIX + run_id


def pending_rows(store_uri: str, run_id: str) -> pd.DataFrame:
    """The run's manifest rows still waiting for a review decision."""
    manifest = read_manifest(open_store(store_uri), run_id)
    if manifest.empty:
        return manifest
    return manifest[manifest["review_status"] == PENDING]


def summarise(rows: pd.DataFrame) -> dict:
    """Counts per category and QC status, plus the partitions involved (small, JSON-able)."""
    if rows.empty:
        return {"total": 0, "partitions": [], "by_category": {}, "flagged_ids": {}}
    by_category: dict[str, dict[str, int]] = {}
    for (category, status), n in rows.groupby(["category", "qc_status"]).size().items():
        by_category.setdefault(str(category), {})[str(status)] = int(n)
    flagged = rows[rows["qc_status"].isin(["flag", "fail"])]
    return {
        "total": len(rows),
        "partitions": sorted(str(p) for p in rows["partition"].unique()),
        "by_category": by_category,
        "flagged_ids": {
            str(c): sorted(str(i) for i in g["image_id"]) for c, g in flagged.groupby("category")
        },
    }


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def summarise_pending(store_uri: str, run_id: str) -> dict:
    """What the reviewer is asked about: counts only, so the task result stays small."""
    return summarise(pending_rows(store_uri, run_id))


def row_versions(rows: pd.DataFrame) -> dict[str, str]:
    """image id -> the row's version (its `created_at`): what a decision records it was shown.

    A re-edit of the item writes a new row with a new `created_at`, so a recorded decision does not
    carry over to an output nobody has seen.
    """
    return {str(i): pd.Timestamp(t).isoformat() for i, t in zip(rows["image_id"], rows["created_at"], strict=True)}


def covered_rows(rows: pd.DataFrame, items: Mapping[str, str]) -> pd.DataFrame:
    """The rows whose image id and version are both in `items`."""
    mask = [items.get(str(i)) == pd.Timestamp(t).isoformat()
            for i, t in zip(rows["image_id"], rows["created_at"], strict=True)]
    return rows[mask] if len(rows) else rows


def verdicts_for(
    rows: pd.DataFrame,
    *,
    outcome: str,
    approve_all_passing: bool = False,
    approve_ids: Iterable[str] = (),
    reject_ids: Iterable[str] = (),
    categories: Iterable[str] | None = None,
) -> dict[str, str]:
    """Verdict per pending image_id, for one decision.

    `outcome` is "decision" (a reviewer or the auto policy answered) or "timeout".
    Rules, chosen so that nothing reaches the catalogue without someone saying yes to it:
    - timeout: every pending row becomes `expired`;
    - error rows (no output) are never approved; a decision rejects them;
    - `reject_ids` wins over `approve_ids` when an id is in both;
    - explicit `approve_ids` are approved even when QC flagged them (the reviewer looked);
    - `approve_all_passing` approves QC `pass` rows;
    - every other row inside the decision's scope is rejected (a decision was given for it);
    - rows outside `categories` are not touched and stay pending for the next round; None means
      every category, an empty list means only the listed ids.
    """
    pending = rows[rows["review_status"] == PENDING]
    if outcome == "timeout":
        return {str(i): EXPIRED for i in pending["image_id"]}
    if outcome != "decision":
        raise ValueError(f"unknown review outcome {outcome!r}")
    scope = set(categories) if categories is not None else None
    approve, reject = set(approve_ids), set(reject_ids)
    verdicts: dict[str, str] = {}
    for image_id, category, qc_status in zip(
        pending["image_id"].astype(str), pending["category"].astype(str), pending["qc_status"], strict=True
    ):
        explicit = image_id in approve or image_id in reject
        if scope is not None and category not in scope and not explicit:
            continue
        if qc_status == "error" or image_id in reject:
            verdicts[image_id] = REJECTED
        elif image_id in approve or (approve_all_passing and qc_status == "pass"):
            verdicts[image_id] = APPROVED
        else:
            verdicts[image_id] = REJECTED
    return verdicts


def decide(rows: pd.DataFrame, outcome: str, decision: Mapping | None) -> dict[str, dict[str, str]]:
    """Verdicts of `rows` (pending ones) for one decision or a timeout, per partition."""
    d = dict(decision or {})
    by_partition: dict[str, dict[str, str]] = {}
    for partition, part in rows.groupby(rows["partition"].astype(str), sort=True):
        by_partition[str(partition)] = verdicts_for(
            part,
            outcome=outcome,
            approve_all_passing=bool(d.get("approve_all_passing", False)),
            approve_ids=d.get("approve_ids") or (),
            reject_ids=d.get("reject_ids") or (),
            categories=d.get("categories"),
        )
    return by_partition


def review_status_counts(store_uri: str, run_id: str) -> dict[str, int]:
    manifest = read_manifest(open_store(store_uri), run_id)
    if manifest.empty:
        return {}
    return {str(k): int(v) for k, v in manifest["review_status"].value_counts().items()}


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out
