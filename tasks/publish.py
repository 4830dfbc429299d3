"""Publishing: copy approved outputs into the catalogue and record every verdict in the manifest.

One task per manifest partition. The order inside the task is what makes a crash harmless: first the
approved objects are copied (idempotent: same key, same bytes), then the partition's manifest file
is rewritten atomically. A crash in between leaves the rows `pending`; the decision itself is kept in
the store (tasks/decisions.py), so a re-run replays it, copies the same bytes to the same keys again
(`unchanged`) and then records the verdicts; nothing is lost or duplicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.manifest import read_manifest, write_manifest_partition
from storage.run_layout import key_for_uri, published_key
from storage.store import Store, open_store
from tasks.review import APPROVED, PENDING


def publish_object(store: Store, edited_key: str, target_key: str) -> str:
    """Copy one approved output; returns "created", "unchanged" or "replaced".

    Create-if-absent makes a second publish of the same item in the same run a no-op (the bytes are
    identical, so nothing is written). A different object at the key comes from an earlier run's
    approval of the same image: the newer approval replaces it (turn on bucket versioning to keep the
    old bytes).
    """
    data = store.get_bytes(edited_key)
    if store.create_if_absent(target_key, data):
        return "created"
    if store.get_bytes(target_key) == data:
        return "unchanged"
    store.put_bytes(target_key, data, content_type="image/png")
    return "replaced"


@task(retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE)
def publish_partition(
    store_uri: str,
    run_id: str,
    partition: str,
    verdicts: Mapping[str, str],
    reviewer: str | None,
    reviewed_at: str,
) -> dict[str, int]:
    """Apply `verdicts` (image_id -> status) to one partition: copy the approved, then record all.

    Rows that are no longer pending keep their recorded verdict, so replaying a decision after a
    crash or a suspend/resume re-run changes nothing that was already written.
    """
    store = open_store(store_uri)
    manifest = read_manifest(store, run_id)
    rows = manifest[manifest["partition"].astype(str) == partition].to_dict("records")
    when = datetime.fromisoformat(reviewed_at).astimezone(UTC)
    counts = {"created": 0, "unchanged": 0, "replaced": 0}
    changed = False
    for row in rows:
        verdict = verdicts.get(str(row["image_id"]))
        if verdict is None or row["review_status"] != PENDING:
            continue
        if verdict == APPROVED:
            edited_key = key_for_uri(store, row["output_uri"])
            target = published_key(row["category"], str(row["image_id"]), edited_key)
            counts[publish_object(store, edited_key, target)] += 1
            row["published_uri"] = store.uri_for(target)
        row["review_status"] = verdict
        row["reviewer"] = reviewer
        row["reviewed_at"] = when
        changed = True
    if changed:
        write_manifest_partition(store, run_id, partition, rows)
    return counts
