"""The analytics contract: schema checks, Hive-partitioned files per run, schema evolution, on a local
folder and on SeaweedFS."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.run_layout import RunLayoutError, run_category_table_key, run_table_key
from storage.run_table import (
    RUN_CATEGORY_SCHEMA,
    RUN_TABLE_SCHEMA,
    RunTableError,
    read_run_category_table,
    read_run_table,
    write_run_category_table,
    write_run_table,
)

NIGHT = datetime(2026, 11, 1, 2, tzinfo=UTC)


def run_row(run_id: str, scheduled_at: datetime, **fields) -> dict:
    """A valid run row: zero counts, empty timings, plus `fields`."""
    row = {f.name: 0 for f in RUN_TABLE_SCHEMA if f.type == pa.int64()}
    row |= {"run_id": run_id, "scheduled_at": scheduled_at, "finished_at": scheduled_at + timedelta(hours=1),
            "reviewers": [], "timings": "{}"}
    return row | fields


def category_row(run_id: str, category: str, **fields) -> dict:
    row = {f.name: 0 for f in RUN_CATEGORY_SCHEMA if f.type == pa.int64()}
    row |= {"run_id": run_id, "category": category, "error_codes": [], "instruction_status": "reused"}
    return row | fields


def test_rows_round_trip_through_one_hive_folder_per_run_in_night_order(store):
    # Written out of order: reading sorts by scheduled_at, not by listing order.
    write_run_table(store, run_row("night-2", NIGHT + timedelta(days=1), items=30, qc_flag=6,
                                   reviewers=["alice", "bob"], review_wait_s=9000.0))
    write_run_table(store, run_row("night-1", NIGHT, items=24, qc_flag=2, instruction_routes=["instruct"]))
    write_run_category_table(store, "night-1", [
        category_row("night-1", "warm", items=24, error_codes=[{"error_code": "truncated", "items": 2}]),
    ])

    assert store.exists("runs/run=night-1/run.parquet") and store.exists(run_table_key("night-2"))
    assert store.exists("runs/run=night-1/categories.parquet")
    runs = read_run_table(store).to_pylist()
    assert [r["run_id"] for r in runs] == ["night-1", "night-2"]
    assert (runs[0]["items"], runs[0]["qc_flag"], runs[0]["instruction_routes"]) == (24, 2, ["instruct"])
    assert runs[1]["reviewers"] == ["alice", "bob"] and runs[1]["review_wait_s"] == 9000.0
    assert runs[0]["scheduled_at"] == NIGHT and runs[0]["review_wait_s"] is None
    categories = read_run_category_table(store).to_pylist()
    assert [(c["run_id"], c["category"], c["error_codes"]) for c in categories] == [
        ("night-1", "warm", [{"error_code": "truncated", "items": 2}])]
    assert read_run_table(store, "night-2").column("run_id").to_pylist() == ["night-2"]


def test_rewriting_a_run_replaces_its_row(tmp_path):
    from storage.store import LocalStore

    store = LocalStore(tmp_path)
    write_run_table(store, run_row("night-1", NIGHT, items=10))
    write_run_table(store, run_row("night-1", NIGHT, items=12))
    assert read_run_table(store).column("items").to_pylist() == [12]


def test_summaries_and_other_files_under_runs_are_not_rows(tmp_path):
    from storage.store import LocalStore

    store = LocalStore(tmp_path)
    store.put_bytes("runs/night-1/summary.json", json.dumps({"run_id": "night-1"}).encode())
    store.put_bytes("runs/run=night-1/notes.parquet", b"not a table")
    assert read_run_table(store).num_rows == 0 and read_run_category_table(store).num_rows == 0
    assert read_run_table(store).schema == RUN_TABLE_SCHEMA


@pytest.mark.parametrize(
    ("fields", "message"),  # messages are regexes
    [
        ({"colour": "red"}, r"unknown columns \['colour'\]"),
        ({"finished_at": None}, "finished_at is required"),
        ({"review_opened_at": datetime(2026, 11, 1, 2)}, "review_opened_at must be a timezone-aware"),
        ({"qc_flag": -1}, "must be a count"),
        ({"items": 2.5}, "must be a count"),
    ],
)
def test_bad_run_rows_are_refused_before_anything_is_written(tmp_path, fields, message):
    from storage.store import LocalStore

    store = LocalStore(tmp_path)
    with pytest.raises(RunTableError, match=message):
        write_run_table(store, run_row("night-1", NIGHT, **fields))
    assert list(store.list("")) == []


def test_bad_category_rows_are_refused(tmp_path):
    from storage.store import LocalStore

    store = LocalStore(tmp_path)
    with pytest.raises(RunTableError, match="instruction_status 'maybe'"):
        write_run_category_table(store, "night-1", [category_row("night-1", "warm", instruction_status="maybe")])
    with pytest.raises(RunTableError, match="cannot be written as run 'night-2'"):
        write_run_category_table(store, "night-2", [category_row("night-1", "warm")])
    with pytest.raises(RunLayoutError, match="must not contain"):
        write_run_category_table(store, "night=1", [category_row("night=1", "warm")])


def test_files_written_before_a_column_existed_read_back_with_nulls(tmp_path):
    """Adding a nullable column (e.g. a new stage timing) must not break reading older nights."""
    from storage.store import LocalStore

    store = LocalStore(tmp_path)
    write_run_table(store, run_row("night-2", NIGHT + timedelta(days=1), learn_s=4.0))
    old = pa.Table.from_pylist([run_row("night-1", NIGHT, learn_s=3.0)], schema=RUN_TABLE_SCHEMA)
    old = old.drop_columns(["learn_s", "instruction_routes"])
    buf = io.BytesIO()
    pq.write_table(old, buf)
    store.put_bytes(run_table_key("night-1"), buf.getvalue())

    runs = read_run_table(store)
    assert runs.schema == RUN_TABLE_SCHEMA
    assert runs.column("learn_s").to_pylist() == [None, 4.0]
    assert runs.column("instruction_routes").to_pylist() == [None, None]


def test_a_file_missing_a_required_column_names_the_file(tmp_path):
    from storage.store import LocalStore

    store = LocalStore(tmp_path)
    table = pa.Table.from_pylist([category_row("night-1", "warm")], schema=RUN_CATEGORY_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table.drop_columns(["items"]), buf)
    store.put_bytes(run_category_table_key("night-1"), buf.getvalue())
    with pytest.raises(RunTableError, match=r"categories\.parquet: required column items is missing"):
        read_run_category_table(store)
