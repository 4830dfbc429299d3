"""Ingest: what the run has to work with. Exemplar pairs are validated (a bad pair is reported and
left out, the rest are used) and the catalogue index is read into per-partition work lists."""

from __future__ import annotations

from prefect import get_run_logger, task

from editing.instruct import pair_sha256
from editing.quality import reference_shift
from storage.images import ImageError
from storage.layout import (
    list_categories,
    list_exemplar_pairs,
    load_pair,
    read_catalogue_index,
    stray_exemplar_keys,
)
from storage.store import UnsafePathError, open_store


@task(retries=2, retry_delay_seconds=[2, 10])
def exemplar_categories(store_uri: str, wanted: list[str] | None) -> list[str]:
    """Categories with exemplars, limited to `wanted` when given; keys in no category are reported."""
    store = open_store(store_uri)
    for problem in stray_exemplar_keys(store):
        get_run_logger().warning("exemplars: %r (%s): %s", problem.key, problem.code, problem.reason)
    found = list_categories(store)
    return [c for c in found if wanted is None or c in wanted]


@task(retries=2, retry_delay_seconds=[2, 10])
def validate_exemplars(store_uri: str, category: str) -> dict:
    """Usable pairs (keys and content hashes), the problems found, and the exemplars' colour shift."""
    store = open_store(store_uri)
    pairs, layout_problems = list_exemplar_pairs(store, category)
    problems = [{"key": p.key, "code": p.code, "reason": p.reason} for p in layout_problems]
    usable, images = [], []
    for pair in pairs:
        try:
            before, after = load_pair(store, pair)
        except ImageError as exc:
            problems.append({"key": exc.key, "code": exc.code, "reason": str(exc)})
            continue
        except UnsafePathError as exc:
            problems.append({"key": exc.key, "code": "unsafe_path", "reason": str(exc)})
            continue
        images.append((before, after))
        usable.append({"pair_id": pair.pair_id, "before_key": pair.before_key, "after_key": pair.after_key,
                       "sha256": pair_sha256(before, after)})
    for problem in problems:
        get_run_logger().warning("exemplars %s: %s (%s): %s", category, problem["key"], problem["code"],
                                 problem["reason"])
    return {"category": category, "pairs": usable, "problems": problems,
            "reference_shift": reference_shift(images) if images else None}


@task(retries=2, retry_delay_seconds=[2, 10])
def catalogue_partitions(store_uri: str, wanted: list[str] | None) -> dict[str, list[dict]]:
    """partition -> its items (image_id, key, category, index_error), sorted, so every run splits work
    identically; a row with a bad key keeps its place and becomes an error row downstream."""
    index = read_catalogue_index(open_store(store_uri))
    if wanted is not None:
        index = index[index["category"].isin(wanted)]
    index = index.sort_values(["partition", "image_id"])
    return {
        str(partition): rows[["image_id", "key", "category", "index_error"]].to_dict("records")
        for partition, rows in index.groupby("partition", sort=True)
    }
