"""The Parquet manifest: one row per catalogue item and run, enough to replay or audit any output.

`MANIFEST_SCHEMA` is the only definition of the columns; writers go through `manifest_row`, which
refuses bad values before they reach a file that dashboards and DuckDB queries depend on. Files are
Hive-partitioned (`storage.run_layout.manifest_key`) and each is written in a single
atomic put, last, so a crashed partition leaves no half-written manifest and is simply redone.
"""

from __future__ import annotations

import io
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.run_layout import MANIFEST_PREFIX, RunLayoutError, manifest_key, manifest_prefix, segment
from storage.store import NotFoundError, Store

__all__ = [
    "MANIFEST_SCHEMA",
    "QC_STATUSES",
    "REVIEW_STATUSES",
    "ManifestError",
    "keep_recorded_verdicts",
    "manifest_row",
    "read_manifest",
    "write_manifest_partition",
]

QC_STATUSES = ("pass", "flag", "fail", "error")
REVIEW_STATUSES = ("pending", "approved", "rejected", "expired")

_UTC_TS = pa.timestamp("us", tz="UTC")
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("partition", pa.string(), nullable=False),
        pa.field("source_uri", pa.string()),
        pa.field("output_uri", pa.string()),
        pa.field("method", pa.string(), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("instruction_id", pa.string()),
        pa.field("instruction_sha256", pa.string()),
        pa.field("params", pa.string(), nullable=False),
        pa.field("seed", pa.int64()),
        pa.field("qc_ssim_structure", pa.float64()),
        pa.field("qc_edit_strength", pa.float64()),
        pa.field("qc_direction_agreement", pa.float64()),
        pa.field("qc_clipped_fraction", pa.float64()),
        pa.field("qc_perceptual_distance", pa.float64()),
        pa.field("qc_figures", pa.string(), nullable=False),
        pa.field("qc_status", pa.string()),
        pa.field("review_status", pa.string(), nullable=False),
        pa.field("reviewer", pa.string()),
        pa.field("reviewed_at", _UTC_TS),
        pa.field("published_uri", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("timings", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64()),
        pa.field("created_at", _UTC_TS, nullable=False),
    ]
)

_REQUIRED = ("run_id", "image_id", "category", "partition", "method")
_JSON_COLUMNS = ("params", "qc_figures", "timings")
_ENUMS = {"qc_status": QC_STATUSES, "review_status": REVIEW_STATUSES}


class ManifestError(ValueError):
    """A manifest row or file that does not match `MANIFEST_SCHEMA`."""


def _json_text(name: str, value: Any) -> str:
    """JSON columns accept a dict/list (serialised with sorted keys) or a string that parses."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{name}: not valid JSON: {exc}") from exc
        return value
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{name}: not JSON-serialisable: {exc}") from exc


def _timestamp(name: str, value: Any) -> datetime | None:
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        raise ManifestError(f"{name}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ManifestError(f"{name}: naive datetime {value}; pass a timezone-aware (UTC) one")
    return value.astimezone(UTC)


def manifest_row(**fields: Any) -> dict[str, Any]:
    """A complete, validated row: unknown columns and bad values raise `ManifestError`.

    Defaults: review_status "pending", created_at now (UTC), JSON columns "{}", everything else
    null. Calling it again on its own output is a no-op, so writers can re-validate freely.
    """
    names = set(MANIFEST_SCHEMA.names)
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ManifestError(f"unknown manifest columns {unknown}")
    # Rows read back through pandas carry NaN/NaT for nulls; treat them as null so they round-trip.
    row: dict[str, Any] = {name: _null_to_none(fields.get(name)) for name in MANIFEST_SCHEMA.names}
    ident = f"manifest row (run_id={row['run_id']!r}, image_id={row['image_id']!r})"
    for name in _REQUIRED:
        if row[name] is None or row[name] == "":
            raise ManifestError(f"{ident}: {name} is required")
    row["review_status"] = row["review_status"] or "pending"
    row["created_at"] = row["created_at"] or datetime.now(UTC)
    try:
        for field in MANIFEST_SCHEMA:
            name, value = field.name, row[field.name]
            if name in _JSON_COLUMNS:
                row[name] = _json_text(name, value)
            elif field.type == _UTC_TS:
                row[name] = _timestamp(name, value)
            elif value is None:
                continue
            elif pa.types.is_string(field.type):
                if not isinstance(value, str | int):
                    raise ManifestError(f"{name}: expected a string, got {type(value).__name__}")
                row[name] = str(value)
            elif pa.types.is_int64(field.type):
                row[name] = _int64(name, value)
            elif pa.types.is_float64(field.type):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ManifestError(f"{name}: expected a number, got {value!r}")
                row[name] = float(value)
        for name, allowed in _ENUMS.items():
            if row[name] is not None and row[name] not in allowed:
                raise ManifestError(f"{name}: {row[name]!r} is not one of {list(allowed)}")
        for name in ("run_id", "partition"):
            _segment(name, row[name])
    except ManifestError as exc:
        raise ManifestError(f"{ident}: {exc}") from None
    return row


def _null_to_none(value: Any) -> Any:
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _int64(name: str, value: Any) -> int:
    """Integers of any kind, and integral floats (pandas turns an int column with nulls into floats)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool | numbers.Integral):
        if not float(value).is_integer():
            raise ManifestError(f"{name}: expected an integer, got {value!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -(2**63) <= value < 2**63:
        raise ManifestError(f"{name}: expected a 64-bit integer, got {value!r}")
    return int(value)


def _segment(name: str, value: str) -> str:
    """run_id and partition become key segments (storage.run_layout); a bad one is a bad row."""
    try:
        return segment(name, value)
    except RunLayoutError as exc:
        raise ManifestError(str(exc)) from None


def write_manifest_partition(
    store: Store, run_id: str, partition: str | int, rows: Iterable[Mapping[str, Any]]
) -> str:
    """Validate every row, then write the partition's file in one put; returns its key.

    A re-run of the partition overwrites the same key, so retries never duplicate rows.
    """
    key = manifest_key(run_id, partition)
    checked = [manifest_row(**row) for row in rows]
    for row in checked:
        if row["run_id"] != run_id or row["partition"] != str(partition):
            raise ManifestError(
                f"row {row['image_id']!r} belongs to run {row['run_id']!r} partition {row['partition']!r}, "
                f"not to {key}"
            )
    table = pa.Table.from_pylist(checked, schema=MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put_bytes(key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return key


def keep_recorded_verdicts(
    store: Store, run_id: str, partition: str, rows: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """`rows` for a rewrite of the partition's file, with every row already decided kept as written.

    A partition is edited again when its completion marker is lost or its run id is reused; its items
    come back as fresh `pending` rows, but a verdict recorded on the old file, and what it published,
    must not be undone by the rewrite. Decided rows of items no longer in `rows` are kept too.
    """
    try:
        data = store.get_bytes(manifest_key(run_id, partition))
    except NotFoundError:
        return list(rows)
    decided = {row["image_id"]: row for row in _read_part(store, manifest_key(run_id, partition), data).to_pylist()
               if row["review_status"] != "pending"}
    return [decided.pop(row["image_id"], row) for row in rows] + list(decided.values())


def _read_part(store: Store, key: str, data: bytes) -> pa.Table:
    table = pq.read_table(io.BytesIO(data))
    if not table.schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        raise ManifestError(f"{store.uri_for(key)}: schema differs from MANIFEST_SCHEMA")
    return table


def read_manifest(store: Store, run_id: str | None = None) -> pd.DataFrame:
    """All manifest rows (of one run, if given) as a DataFrame with the schema's columns and types."""
    prefix = MANIFEST_PREFIX if run_id is None else manifest_prefix(run_id) + "/"
    tables = []
    for key in store.list(prefix):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet"):
            tables.append(_read_part(store, key, store.get_bytes(key)))
    table = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    return table.to_pandas()
