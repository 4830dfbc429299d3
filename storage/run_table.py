"""The analytics contract: one row per run (the run table) and one row per run and category.

Dashboards, `docs/queries.sql` and the Prefect event read these two tables instead of every night's
manifest, so trends over a year stay a scan of a few hundred small rows. `RUN_TABLE_SCHEMA` and
`RUN_CATEGORY_SCHEMA` are their only definitions; docs/monitoring.md describes each column.

Categories are rows, not columns: the standard questions group and filter by category (flag rate by
category and night), and a new category must not change the schema. Error codes per category are a
list of (error_code, items) structs, so "error codes over time" needs no manifest scan either.

Files are Hive-partitioned, one folder per run (`storage.run_layout.run_table_key`), each written in
one atomic put; a re-run of the same run id overwrites its own files, so rows are never duplicated.
Adding a nullable column later is backwards compatible: older files read back with nulls there.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.run_layout import (
    RUN_CATEGORY_TABLE_FILE,
    RUN_TABLE_FILE,
    RUNS_PREFIX,
    run_category_table_key,
    run_table_file_run_id,
    run_table_key,
)
from storage.store import Store

__all__ = [
    "INSTRUCTION_STATUSES",
    "RUN_CATEGORY_SCHEMA",
    "RUN_TABLE_SCHEMA",
    "RunTableError",
    "read_run_category_table",
    "read_run_table",
    "write_run_category_table",
    "write_run_table",
]

INSTRUCTION_STATUSES = ("learned", "reused", "failed", "none")

_UTC_TS = pa.timestamp("us", tz="UTC")
_COUNT = pa.int64()
_QC_COUNTS = ("qc_pass", "qc_flag", "qc_fail", "qc_error")
_REVIEW_COUNTS = ("review_pending", "review_approved", "review_rejected", "review_expired")
_STAGES = ("ingest_s", "learn_s", "edit_s", "report_s", "review_s", "total_s")


def _counts(*names: str) -> list[pa.Field]:
    return [pa.field(name, _COUNT, nullable=False) for name in names]


RUN_TABLE_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("flow_run_url", pa.string()),
        pa.field("scheduled_at", _UTC_TS, nullable=False),
        pa.field("finished_at", _UTC_TS, nullable=False),
        *_counts("items", *_QC_COUNTS, *_REVIEW_COUNTS),
        *_counts("published", "published_created", "published_replaced", "published_unchanged"),
        *_counts("partitions", "partitions_edited", "partitions_skipped"),
        *_counts("instructions_learned", "instructions_reused", "instructions_failed"),
        pa.field("instruction_routes", pa.list_(pa.string())),
        pa.field("review_policy", pa.string()),
        pa.field("review_outcome", pa.string()),
        pa.field("reviewers", pa.list_(pa.string()), nullable=False),
        pa.field("review_opened_at", _UTC_TS),
        pa.field("review_decided_at", _UTC_TS),
        pa.field("review_wait_s", pa.float64()),
        pa.field("images_edited", _COUNT, nullable=False),
        pa.field("edit_wall_s", pa.float64()),
        pa.field("images_per_s", pa.float64()),
        *[pa.field(name, pa.float64()) for name in _STAGES],
        pa.field("timings", pa.string(), nullable=False),
    ]
)

ERROR_CODE_COUNT = pa.struct([pa.field("error_code", pa.string(), nullable=False),
                              pa.field("items", _COUNT, nullable=False)])

RUN_CATEGORY_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        *_counts("items", *_QC_COUNTS, *_REVIEW_COUNTS, "published"),
        pa.field("error_codes", pa.list_(ERROR_CODE_COUNT), nullable=False),
        pa.field("qc_ssim_structure_mean", pa.float64()),
        pa.field("qc_edit_strength_mean", pa.float64()),
        pa.field("qc_direction_agreement_mean", pa.float64()),
        pa.field("instruction_status", pa.string(), nullable=False),
        pa.field("instruction_route", pa.string()),
        pa.field("instruction_id", pa.string()),
        pa.field("review_decided_at", _UTC_TS),
        pa.field("review_wait_s", pa.float64()),
        pa.field("contact_sheet_uri", pa.string()),
    ]
)


class RunTableError(ValueError):
    """A row or file that does not match the run table's or the category table's schema."""


def _check(schema: pa.Schema, row: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The row with every column of `schema`: unknown columns, missing required values, naive
    datetimes and negative counts are refused here, before a dashboard reads them."""
    unknown = sorted(set(row) - set(schema.names))
    if unknown:
        raise RunTableError(f"{what}: unknown columns {unknown}")
    out = {name: row.get(name) for name in schema.names}
    for field in schema:
        value = out[field.name]
        if value is None:
            if not field.nullable:
                raise RunTableError(f"{what}: {field.name} is required")
        elif field.type == _UTC_TS and (not isinstance(value, datetime) or value.tzinfo is None):
            raise RunTableError(f"{what}: {field.name} must be a timezone-aware datetime, got {value!r}")
        elif field.type == _COUNT and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise RunTableError(f"{what}: {field.name} must be a count (int >= 0), got {value!r}")
    if "instruction_status" in out and out["instruction_status"] not in INSTRUCTION_STATUSES:
        raise RunTableError(f"{what}: instruction_status {out['instruction_status']!r} is not one of "
                            f"{list(INSTRUCTION_STATUSES)}")
    return out


def _put(store: Store, key: str, schema: pa.Schema, rows: list[dict[str, Any]]) -> str:
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise RunTableError(f"{key}: {exc}") from None
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put_bytes(key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return key


def write_run_table(store: Store, row: Mapping[str, Any]) -> str:
    """Validate the run's row and write it in one put; returns its key."""
    checked = _check(RUN_TABLE_SCHEMA, row, f"run table row (run_id={row.get('run_id')!r})")
    return _put(store, run_table_key(checked["run_id"]), RUN_TABLE_SCHEMA, [checked])


def write_run_category_table(store: Store, run_id: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """Validate the run's per-category rows and write them in one put; returns the key."""
    checked = [_check(RUN_CATEGORY_SCHEMA, row, f"category row ({run_id}, {row.get('category')!r})")
               for row in rows]
    if wrong := sorted({r["run_id"] for r in checked} - {run_id}):
        raise RunTableError(f"category rows of runs {wrong} cannot be written as run {run_id!r}")
    return _put(store, run_category_table_key(run_id), RUN_CATEGORY_SCHEMA, checked)


def read_run_table(store: Store, run_id: str | None = None) -> pa.Table:
    """Every run's row (or one run's), ordered by scheduled_at."""
    table = _read(store, RUN_TABLE_FILE, RUN_TABLE_SCHEMA, run_id)
    return table.sort_by([("scheduled_at", "ascending"), ("run_id", "ascending")])


def read_run_category_table(store: Store, run_id: str | None = None) -> pa.Table:
    """Every run's per-category rows (or one run's), ordered by run id and category."""
    table = _read(store, RUN_CATEGORY_TABLE_FILE, RUN_CATEGORY_SCHEMA, run_id)
    return table.sort_by([("run_id", "ascending"), ("category", "ascending")])


def _read(store: Store, file: str, schema: pa.Schema, run_id: str | None) -> pa.Table:
    prefix = RUNS_PREFIX if run_id is None else run_table_key(run_id).rsplit("/", 1)[0] + "/"
    keys = [key for key in store.list(prefix) if run_table_file_run_id(key, file) is not None]
    # One small object per run: fetched concurrently, a year of nights is a few round trips deep.
    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = list(pool.map(lambda key: _conform(store, key, schema), keys))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _conform(store: Store, key: str, schema: pa.Schema) -> pa.Table:
    """The file's table in `schema`: columns it predates are null, columns it has beyond are dropped."""
    # ParquetFile.read: about 5x faster than read_table (no dataset machinery) on files this small.
    table = pq.ParquetFile(pa.BufferReader(store.get_bytes(key))).read()
    if table.schema.equals(schema, check_metadata=False):
        return table
    columns = []
    for field in schema:
        if field.name in table.column_names:
            try:
                columns.append(table[field.name].cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise RunTableError(f"{store.uri_for(key)}: column {field.name}: {exc}") from None
        elif field.nullable:
            columns.append(pa.nulls(len(table), field.type))
        else:
            raise RunTableError(f"{store.uri_for(key)}: required column {field.name} is missing")
    return pa.Table.from_arrays(columns, schema=schema)
