"""Publishing: copy approved outputs into the catalogue and record every verdict in the manifest.

One task per manifest partition. The order inside the task is what makes a crash harmless: first the
approved objects are copied (idempotent: same key, same bytes), then the partition's manifest file
is rewritten atomically. A crash in between leaves the rows `pending`; the decision itself is kept in
the store (tasks/decisions.py), so a re-run replays it, copies the same bytes to the same keys again
(`unchanged`) and then records the verdicts; nothing is lost or duplicated.

Each published object has a publication record (`publications/<category>/<image_id>.json`: run id,
when its output was edited, digest), written after the object. It keeps the catalogue's order:
an approval from a run whose output is older than the published one is `superseded`, not copied;
and a rejection or expiry takes back what the same run published (a crash between copy and record,
or a manifest rewritten to pending, can otherwise leave a rejected image in the catalogue).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.manifest import read_manifest, write_manifest_partition
from storage.run_layout import key_for_uri, publication_key, published_key
from storage.store import NotFoundError, Store, open_store
from tasks.review import APPROVED, EXPIRED, PENDING, REJECTED

SUPERSEDED = "superseded"


def publish_object(store: Store, edited_key: str, target_key: str) -> str:
    """Copy one approved output; returns "created", "unchanged" or "replaced".

    Create-if-absent makes a second publish of the same item in the same run a no-op (the bytes are
    identical, so nothing is written). A different object at the key is replaced (callers check
    first that it is not a newer run's; turn on bucket versioning to keep the old bytes).
    """
    return _copy(store, store.get_bytes(edited_key), target_key)


def _copy(store: Store, data: bytes, target_key: str) -> str:
    if store.create_if_absent(target_key, data):
        return "created"
    if store.get_bytes(target_key) == data:
        return "unchanged"
    store.put_bytes(target_key, data, content_type="image/png")
    return "replaced"


def publication(store: Store, category: str, image_id: str) -> dict | None:
    """The record of the run that published this image, or None (none, or unreadable)."""
    try:
        record = json.loads(store.get_bytes(publication_key(category, image_id)))
        datetime.fromisoformat(record["edited_at"])
        return record if isinstance(record["run_id"], str) else None
    except NotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def publish_item(store: Store, run_id: str, row: Mapping) -> tuple[str, str | None]:
    """Publish one approved row; returns (outcome, published key or None when superseded).

    The output is copied unless the image's current publication came from another run whose output
    was edited later: an older run approved late never replaces a newer run's image.
    """
    category, image_id = str(row["category"]), str(row["image_id"])
    edited_key = key_for_uri(store, row["output_uri"])
    target = published_key(category, image_id, edited_key)
    edited_at = pd.Timestamp(row["created_at"]).to_pydatetime()
    current = publication(store, category, image_id)
    if current and current["run_id"] != run_id and datetime.fromisoformat(current["edited_at"]) > edited_at:
        return SUPERSEDED, None
    data = store.get_bytes(edited_key)
    outcome = _copy(store, data, target)
    record = {"run_id": run_id, "edited_at": edited_at.isoformat(), "key": target,
              "published_at": datetime.now(UTC).isoformat(), "sha256": hashlib.sha256(data).hexdigest()}
    store.put_bytes(publication_key(category, image_id), json.dumps(record, sort_keys=True).encode(),
                    content_type="application/json")
    return outcome, target


def unpublish_item(store: Store, run_id: str, row: Mapping) -> bool:
    """Take back the image this run published for `row`, if it is still this run's; True if removed.

    Only an object whose publication names this run and whose bytes are the ones it recorded: a newer
    run's copy (even one whose record was never written) stays.
    """
    category, image_id = str(row["category"]), str(row["image_id"])
    current = publication(store, category, image_id)
    if not current or current["run_id"] != run_id:
        return False
    try:
        data = store.get_bytes(current["key"])
    except NotFoundError:
        return False
    if hashlib.sha256(data).hexdigest() != current.get("sha256"):
        return False
    store.delete(current["key"])
    store.delete(publication_key(category, image_id))
    return True


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
    crash or a suspend/resume re-run changes nothing that was already written. An approved row whose
    image a newer run already published is recorded approved with `error_code` "superseded" and no
    `published_uri`.
    """
    store = open_store(store_uri)
    manifest = read_manifest(store, run_id)
    rows = manifest[manifest["partition"].astype(str) == partition].to_dict("records")
    when = datetime.fromisoformat(reviewed_at).astimezone(UTC)
    counts = {"created": 0, "unchanged": 0, "replaced": 0, SUPERSEDED: 0, "unpublished": 0}
    changed = False
    for row in rows:
        verdict = verdicts.get(str(row["image_id"]))
        if verdict is None or row["review_status"] != PENDING:
            continue
        if verdict == APPROVED:
            outcome, target = publish_item(store, run_id, row)
            counts[outcome] += 1
            row["published_uri"] = store.uri_for(target) if target else None
            if target is None:
                row["error_code"], row["error"] = SUPERSEDED, "a newer run's edit of this image is published"
        elif verdict in (REJECTED, EXPIRED) and unpublish_item(store, run_id, row):
            counts["unpublished"] += 1
            row["published_uri"] = None
        row["review_status"] = verdict
        row["reviewer"] = reviewer
        row["reviewed_at"] = when
        changed = True
    if changed:
        write_manifest_partition(store, run_id, partition, rows)
    return counts
