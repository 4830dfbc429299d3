"""Two nights of a small shop's output store, written through the project's own writers.

Night 1 went through a human review (alice decides 2.5 h after the gate first paused, one error
category, a truncated upload); night 2 was auto-approved and its `soft-matte` flag rate jumped.
The manifest rows, images, contact sheets and gate records are real files, so the analytics rows,
the SQL, the event and the dashboard are all tested on what a run would leave.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from PIL import Image

from storage.images import encode_png
from storage.manifest import write_manifest_partition
from storage.run_layout import contact_sheet_key, gate_key, output_key
from storage.store import Store

CATEGORIES = ("crisp-product", "soft-matte", "warm-studio")
NIGHTS = ("20261101T020000Z", "20261102T020000Z")
SCHEDULED = {run: datetime(2026, 11, 1 + n, 2, tzinfo=UTC) for n, run in enumerate(NIGHTS)}
ITEMS_PER_CATEGORY = 8
OPENED_AT = SCHEDULED[NIGHTS[0]] + timedelta(minutes=30)
REVIEW_WAIT_S = 2.5 * 3600
REVIEWER = "alice"
# (night, category) -> QC statuses of its items, in image order
QC = {
    (0, "crisp-product"): ["pass"] * 7 + ["flag"],
    (0, "soft-matte"): ["pass"] * 7 + ["flag"],
    (0, "warm-studio"): ["pass"] * 6 + ["fail", "error"],
    (1, "crisp-product"): ["pass"] * 7 + ["flag"],
    (1, "soft-matte"): ["pass"] * 4 + ["flag"] * 4,
    (1, "warm-studio"): ["pass"] * 7 + ["error"],
}
ERROR_CODES = {0: "truncated", 1: "not_found"}


def _image(shade: int) -> bytes:
    return encode_png(Image.new("RGB", (48, 48), (shade, 120, 255 - shade)))


def write_night(store: Store, night: int) -> tuple[str, dict, dict, dict]:
    """Manifest, images, contact sheets and review records of one night.

    Returns (run_id, summary, instructions, flow run fields) as `catalogue_refresh` would pass them.
    """
    run_id = NIGHTS[night]
    scheduled = SCHEDULED[run_id]
    human = night == 0
    decided_at = OPENED_AT + timedelta(seconds=REVIEW_WAIT_S)
    reviewer = REVIEWER if human else "auto:qc-pass"
    partitions: dict[str, list[dict]] = {}
    for c, category in enumerate(CATEGORIES):
        for i, qc_status in enumerate(QC[(night, category)]):
            image_id = f"{category[:4]}-{i:02d}"
            partition = f"p{i % 2:03d}"
            source_key = f"catalogue/images/{image_id}.png"
            store.put_bytes(source_key, _image(20 * i))
            row = {"run_id": run_id, "image_id": image_id, "category": category, "partition": partition,
                   "method": "instructbrush", "source_uri": store.uri_for(source_key),
                   "qc_status": qc_status, "created_at": scheduled + timedelta(minutes=5, seconds=10 * (i + 8 * c))}
            if qc_status == "error":
                row |= {"error_code": ERROR_CODES[night], "error": "cut off mid-upload"}
            else:
                key = output_key(run_id, category, partition, image_id)
                store.put_bytes(key, _image(255 - 20 * i))
                row |= {"output_uri": store.uri_for(key), "duration_s": 2.0, "qc_ssim_structure": 0.9 - 0.01 * i,
                        "qc_edit_strength": 0.3, "qc_direction_agreement": 0.8}
            approved = qc_status == "pass"
            row |= {"review_status": "approved" if approved else "rejected", "reviewer": reviewer,
                    "reviewed_at": decided_at if human else scheduled + timedelta(minutes=20)}
            if approved:
                row["published_uri"] = store.uri_for(f"published/{category}/{image_id}.png")
            partitions.setdefault(partition, []).append(row)
        store.put_bytes(contact_sheet_key(run_id, category), _image(128))
    for partition, rows in partitions.items():
        write_manifest_partition(store, run_id, partition, rows)
    if human:
        gate = {"deadline": (OPENED_AT + timedelta(hours=24)).isoformat(), "opened_at": OPENED_AT.isoformat()}
        store.put_bytes(gate_key(run_id), json.dumps(gate).encode())
    instructions = {
        c: {"category": c, "status": "ok", "learned": night == 0, "cache_key": f"{c}-key", "route": "instruct"}
        for c in CATEGORIES
    }
    approved_total = sum(s == "pass" for (n, _), statuses in QC.items() if n == night for s in statuses)
    summary = {
        "run_id": run_id,
        "categories": {c: {"category": c, "items": ITEMS_PER_CATEGORY} for c in CATEGORIES},
        "partitions": {"total": 2, "done": 2, "skipped": 0},
        "review": {"policy": "human" if human else "auto_approve_passing", "outcome": "decided",
                   "reviewers": [reviewer], "published": {"created": approved_total, "unchanged": 0,
                                                           "replaced": 0}},
        "timings_s": {"ingest": 1.5, "learn": 60.0 if night == 0 else 0.5, "edit": 40.0, "report": 3.0,
                      "review": REVIEW_WAIT_S if human else 1.0},
    }
    summary["timings_s"]["total"] = round(sum(summary["timings_s"].values()), 2)
    flow_fields = {"flow_run_id": f"00000000-0000-0000-0000-00000000000{night}",
                   "flow_run_url": f"http://127.0.0.1:4200/runs/flow-run/00000000-0000-0000-0000-00000000000{night}",
                   "scheduled_at": scheduled}
    return run_id, summary, instructions, flow_fields


def build_two_nights(store: Store) -> list[str]:
    """Both nights with their analytics rows written; returns the run ids, oldest first."""
    from tasks.monitor import write_run_rows

    for night in range(len(NIGHTS)):
        run_id, summary, instructions, flow_fields = write_night(store, night)
        write_run_rows(store, run_id, summary, instructions, flow_fields)
    return list(NIGHTS)
