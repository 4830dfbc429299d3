"""Every key a catalogue run reads or writes in the output store, in one place.

```
instructions/<category>/<cache_key>.safetensors (+ .json, .cube)   learned once, reused across runs
edited/run=<run_id>/<category>/<partition>/<image_id>.png           one output per item
edited/run=<run_id>/_done/<partition>.json                          partition completion marker
edited/run=<run_id>/_shards/<partition>/<shard>.json                a shard's rows, until its partition is merged
edited/run=<run_id>/contact-sheets/<category>.png                   the reviewer's first look
manifest/run=<run_id>/part-<partition>.parquet                      one row per item (storage.manifest)
review/run=<run_id>/gate.json                                       the review deadline, fixed once
review/run=<run_id>/decisions/<flow_run_id>-<round>.json            every decision, before it acts
published/<category>/<image_id><ext>                                what the catalogue serves
publications/<category>/<image_id>.json                             which run published it, and when
runs/<run_id>/summary.json                                          the run's summary
runs/run=<run_id>/lease.json                                        the live flow run holding the id
runs/run=<run_id>/run.parquet                                       the run table row (storage.run_table)
runs/run=<run_id>/categories.parquet                                the run's per-category rows
prefect-results/<cache key>                                         Prefect task results (JSON) a resume takes back
```

Run ids and partitions become single key segments, so they hold no `/` and no `=` (a Hive-style
`run=<id>` segment must parse back to the id); a run id has at most 64 characters. Every function
validates the key it returns, so a bad id fails where the key is made, with the id named, not later
inside a store call; `item_keys` checks, when the catalogue index is read, every key an item will
produce in any run.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import unquote

from storage.keys import InvalidKeyError, join_key, validate_key
from storage.store import Store

MANIFEST_PREFIX = "manifest/"
REVIEW_PREFIX = "review/"
PUBLISHED_PREFIX = "published"
PUBLICATIONS_PREFIX = "publications"
GATE_FILE = "gate.json"
MAX_RUN_ID_CHARS = 64
# Outputs are PNG whatever the input was (tasks/edit.py), so published keys end the same way.
OUTPUT_SUFFIX = ".png"


class RunLayoutError(ValueError):
    """A run id, partition or item id that cannot become a key segment."""


def segment(name: str, value: str) -> str:
    """`value` as one key segment: valid, and free of `/` and `=`."""
    try:
        validate_key(value)
    except InvalidKeyError as exc:
        raise RunLayoutError(f"{name}: {exc}") from None
    if "/" in value or "=" in value:
        raise RunLayoutError(f"{name}: {value!r} must not contain '/' or '='")
    return value


def _run(run_id: str) -> str:
    if len(run_id) > MAX_RUN_ID_CHARS:
        raise RunLayoutError(f"run_id: {run_id[:20]!r}... is longer than {MAX_RUN_ID_CHARS} characters")
    return f"run={segment('run_id', run_id)}"


# edited/
def edited_prefix(run_id: str) -> str:
    return join_key("edited", _run(run_id))


def output_key(run_id: str, category: str, partition: str, image_id: str) -> str:
    return join_key(edited_prefix(run_id), category, segment("partition", partition), image_id + OUTPUT_SUFFIX)


def done_key(run_id: str, partition: str) -> str:
    return join_key(edited_prefix(run_id), "_done", f"{segment('partition', partition)}.json")


def shard_key(run_id: str, partition: str, shard: int) -> str:
    """One shard of a partition cut for the fan-out (tasks/edit.py): its rows and summary, written when
    the shard is done and merged into the partition's manifest file."""
    return join_key(edited_prefix(run_id), "_shards", segment("partition", partition), f"{shard:05d}.json")


def finished_work_prefix(run_id: str) -> str:
    """One listing prefix under which both the run's partition markers (`_done/`) and its shard files
    (`_shards/`) lie: what a dispatch lists once instead of asking for every piece's key."""
    return edited_prefix(run_id) + "/_"


def contact_sheets_prefix(run_id: str) -> str:
    return join_key(edited_prefix(run_id), "contact-sheets")


def contact_sheet_key(run_id: str, category: str) -> str:
    return join_key(contact_sheets_prefix(run_id), f"{category}.png")


# manifest/
def manifest_prefix(run_id: str) -> str:
    return f"{MANIFEST_PREFIX}{_run(run_id)}"


def manifest_key(run_id: str, partition: str | int) -> str:
    """Hive-style, so DuckDB and pyarrow can prune by run."""
    return f"{manifest_prefix(run_id)}/part-{segment('partition', str(partition))}.parquet"


# review/
def gate_key(run_id: str) -> str:
    return join_key("review", _run(run_id), GATE_FILE)


def decisions_prefix(run_id: str) -> str:
    return join_key("review", _run(run_id), "decisions") + "/"


def decision_key(run_id: str, flow_run_id: str, round_no: int) -> str:
    return decisions_prefix(run_id) + f"{flow_run_id}-{round_no:03d}.json"


def gate_run_id(key: str) -> str | None:
    """The run id of a `review/run=<id>/gate.json` key; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] + "/" != REVIEW_PREFIX or parts[2] != GATE_FILE:
        return None
    return parts[1][len("run=") :] if parts[1].startswith("run=") else None


# published/
def published_key(category: str, image_id: str, edited_key: str) -> str:
    """One key per image, whichever run approved it; the extension follows the edited output."""
    return join_key(PUBLISHED_PREFIX, category, image_id + PurePosixPath(edited_key).suffix)


def publication_key(category: str, image_id: str) -> str:
    """The record of who published `published/<category>/<image_id>`: run id, edit time, digest.

    A sidecar rather than object metadata, so the local store and S3 keep it the same way.
    """
    return join_key(PUBLICATIONS_PREFIX, category, f"{image_id}.json")


def item_keys(category: str, partition: str, image_id: str) -> list[str]:
    """Every key one catalogue item produces in a run, built with the longest run id allowed.

    Checked when the catalogue index is read (storage.layout), so an item whose keys no store can
    hold becomes its own error row there instead of failing its partition's write.
    """
    longest_run_id = "r" * MAX_RUN_ID_CHARS
    edited = output_key(longest_run_id, category, partition, image_id)
    return [edited, published_key(category, image_id, edited), publication_key(category, image_id),
            manifest_key(longest_run_id, partition)]


# runs/
def summary_key(run_id: str) -> str:
    return join_key("runs", segment("run_id", run_id), "summary.json")


# instructions/
def instruction_keys(category: str, cache_key: str) -> tuple[str, str]:
    """`instructions/<category>/<cache_key>.safetensors` and its `.json` metadata."""
    base = join_key("instructions", category, cache_key)
    return base + ".safetensors", base + ".json"


def instruction_cube_key(category: str, cache_key: str) -> str:
    """`instructions/<category>/<cache_key>.cube`: the instruction's LUT for Photoshop, Resolve, ffmpeg."""
    return join_key("instructions", category, cache_key) + ".cube"


def key_for_uri(store: Store, uri: str) -> str:
    """The store-relative key of a URI recorded with `store.uri_for` (the manifest's URIs).

    A local store's `file://` URIs are percent-encoded (`run=` becomes `run%3D`), S3 URIs are not;
    round-tripping through `uri_for` picks the reading that names the same object.
    """
    root = store.uri.rstrip("/") + "/"
    if not uri.startswith(root):
        raise ValueError(f"{uri} is not inside the store {store.uri}")
    rest = uri[len(root) :]
    return next(k for k in (rest, unquote(rest)) if store.uri_for(k) == uri) if "%" in rest else rest


# prefect-results/
RESULTS_PREFIX = "prefect-results"


def result_key(path: str) -> str:
    """`prefect-results/<path>`: a Prefect result record (its storage key is the task's cache key)."""
    return join_key(RESULTS_PREFIX, path)


# runs/run=<run_id>/ (the analytics tables of storage.run_table; Hive-style, one folder per run)
RUNS_PREFIX = "runs/"
RUN_TABLE_FILE = "run.parquet"
RUN_CATEGORY_TABLE_FILE = "categories.parquet"


def lease_key(run_id: str) -> str:
    """`runs/run=<run_id>/lease.json`: which flow run holds the run id now (tasks/lease.py)."""
    return join_key("runs", _run(run_id), "lease.json")


def run_table_key(run_id: str) -> str:
    """`runs/run=<run_id>/run.parquet`: the run's one row of the run table."""
    return join_key("runs", _run(run_id), RUN_TABLE_FILE)


def run_category_table_key(run_id: str) -> str:
    """`runs/run=<run_id>/categories.parquet`: the run's rows of the per-category table."""
    return join_key("runs", _run(run_id), RUN_CATEGORY_TABLE_FILE)


def run_table_file_run_id(key: str, file: str) -> str | None:
    """The run id of a `runs/run=<id>/<file>` key; None for any other key (summaries included)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] + "/" != RUNS_PREFIX or parts[2] != file or not parts[1].startswith("run="):
        return None
    return parts[1][len("run=") :]
