"""Builders shared by the review and reliability tests: a hand-written run in a store, and a
reviewer thread that resumes the paused flow run the way `retouch review` does."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable

from PIL import Image
from prefect.flow_runs import resume_flow_run

from cli.review import ReviewCliError, find_paused_flow_run
from storage.manifest import manifest_row, write_manifest_partition
from storage.store import Store

# (image_id, category, qc_status) per partition
Layout = dict[str, list[tuple[str, str, str]]]

SMALL_LAYOUT: Layout = {
    "p0": [("shoe-1", "shoes", "pass"), ("shoe-2", "shoes", "flag"), ("shoe-3", "shoes", "error")],
    "p1": [("bag-1", "bags", "pass"), ("bag-2", "bags", "pass"), ("bag-3", "bags", "fail")],
}


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


def write_run(store: Store, run_id: str, layout: Layout = SMALL_LAYOUT, shade: int = 10) -> None:
    """Edited outputs and pending manifest rows as the apply step leaves them (error rows: no output)."""
    for partition, items in layout.items():
        rows = []
        for n, (image_id, category, qc_status) in enumerate(items):
            output_uri = None
            if qc_status != "error":
                key = f"edited/run={run_id}/{category}/{partition}/{image_id}.png"
                store.put_bytes(key, png(shade + n))
                output_uri = store.uri_for(key)
            rows.append(
                manifest_row(
                    run_id=run_id,
                    image_id=image_id,
                    category=category,
                    partition=partition,
                    method="instructbrush",
                    output_uri=output_uri,
                    qc_status=qc_status,
                    error_code="truncated" if qc_status == "error" else None,
                )
            )
        write_manifest_partition(store, run_id, partition, rows)


def published_keys(store: Store) -> list[str]:
    return list(store.list("published/"))


class Reviewer(threading.Thread):
    """Waits until the run is paused for review, then answers with each decision in turn.

    Records what the server said to every answer, so tests can assert that bad input is refused.
    """

    def __init__(self, run_id: str, decisions: Iterable[dict], timeout_s: float = 90) -> None:
        super().__init__(daemon=True)
        self.run_id, self.decisions, self.timeout_s = run_id, list(decisions), timeout_s
        self.outcomes: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for decision in self.decisions:
            while time.monotonic() < deadline:
                try:
                    flow_run = find_paused_flow_run(self.run_id)
                    break
                except ReviewCliError:
                    time.sleep(0.3)
            else:
                self.outcomes.append("never paused")
                return
            try:
                resume_flow_run(flow_run.id, run_input=decision)
                self.outcomes.append("accepted")
            except RuntimeError as exc:
                self.outcomes.append(f"refused: {exc}")
