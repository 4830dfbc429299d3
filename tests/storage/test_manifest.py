"""The manifest schema, its validation, and reading it back with pandas and DuckDB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import duckdb
import numpy as np
import pytest

from storage.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    manifest_row,
    read_manifest,
    write_manifest_partition,
)
from storage.run_layout import RunLayoutError, manifest_key
from storage.store import LocalStore


def _row(run_id="2026-11-21", partition="p000", image_id="img-1", **extra):
    base = {
        "run_id": run_id,
        "image_id": image_id,
        "category": "relight",
        "partition": partition,
        "source_uri": f"s3://shop/catalogue/{image_id}.jpg",
        "output_uri": f"s3://shop/edited/{run_id}/{image_id}.png",
        "method": "instructbrush",
        "model_id": "retouch-tiny-ip2p",
        "model_sha256": "ab" * 32,
        "instruction_id": "relight-v1",
        "instruction_sha256": "cd" * 32,
        "params": {"guidance_scale": 7.5, "num_inference_steps": 20},
        "seed": np.int64(1234),
        "qc_ssim_structure": 0.93,
        "qc_status": "pass",
        "timings": {"apply_s": 1.5},
        "duration_s": 1.7,
    }
    base.update(extra)
    return manifest_row(**base)


def test_schema_has_the_documented_columns_in_order():
    assert MANIFEST_SCHEMA.names == [
        "run_id",
        "image_id",
        "category",
        "partition",
        "source_uri",
        "output_uri",
        "method",
        "model_id",
        "model_sha256",
        "instruction_id",
        "instruction_sha256",
        "params",
        "seed",
        "qc_ssim_structure",
        "qc_edit_strength",
        "qc_direction_agreement",
        "qc_clipped_fraction",
        "qc_perceptual_distance",
        "qc_figures",
        "qc_status",
        "review_status",
        "reviewer",
        "reviewed_at",
        "published_uri",
        "error_code",
        "error",
        "timings",
        "duration_s",
        "created_at",
    ]


def test_row_defaults_and_normalisation():
    row = _row()
    assert row["review_status"] == "pending"
    assert row["params"] == '{"guidance_scale": 7.5, "num_inference_steps": 20}'
    assert row["qc_figures"] == "{}"
    assert row["seed"] == 1234 and type(row["seed"]) is int
    assert row["qc_edit_strength"] is None
    assert row["created_at"].tzinfo is not None
    assert manifest_row(**row) == row


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"review_status": "maybe"}, "review_status: 'maybe' is not one of"),
        ({"qc_status": "ok"}, "qc_status: 'ok' is not one of"),
        ({"params": "{not json"}, "params: not valid JSON"),
        ({"seed": "42"}, "seed: expected a 64-bit integer"),
        ({"seed": 2**64}, "seed: expected a 64-bit integer"),
        ({"qc_ssim_structure": "high"}, "qc_ssim_structure: expected a number"),
        ({"reviewed_at": datetime(2026, 1, 1)}, "naive datetime"),
        ({"run_id": "a/b"}, "run_id"),
        ({"partition": "p=1"}, "partition"),
        ({"method": None}, "method is required"),
        ({"colour": "red"}, "unknown manifest columns"),
    ],
)
def test_bad_rows_are_refused_with_a_clear_error(change, message):
    with pytest.raises(ManifestError, match=message) as info:
        _row(**change)
    assert "image_id='img-1'" in str(info.value) or "unknown" in str(info.value)


def test_partition_written_atomically_and_read_back_with_pandas(store):
    rows = [_row(image_id=f"img-{i}", seed=i) for i in range(3)]
    rows.append(
        _row(
            image_id="img-bad",
            output_uri=None,
            qc_status="error",
            error_code="truncated",
            error="catalogue/img-bad.jpg: truncated",
            seed=None,
        )
    )
    key = write_manifest_partition(store, "2026-11-21", "p000", rows)
    assert key == "manifest/run=2026-11-21/part-p000.parquet"
    assert list(store.list("manifest/")) == [key]
    df = read_manifest(store, "2026-11-21")
    assert list(df.columns) == MANIFEST_SCHEMA.names
    assert df["image_id"].tolist() == ["img-0", "img-1", "img-2", "img-bad"]
    assert df.loc[3, "error_code"] == "truncated"
    assert str(df["created_at"].dt.tz) == "UTC"


def test_rewritten_partition_replaces_rows_and_round_trips_through_pandas(store):
    write_manifest_partition(store, "r1", 0, [_row(run_id="r1", partition="0")])
    df = read_manifest(store, "r1")
    records = df.to_dict("records")
    records[0]["review_status"] = "approved"
    records[0]["reviewer"] = "ana"
    records[0]["reviewed_at"] = datetime(2026, 11, 22, 9, 0, tzinfo=timezone(timedelta(hours=2)))
    write_manifest_partition(store, "r1", 0, records)
    again = read_manifest(store, "r1")
    assert len(again) == 1 and again.loc[0, "review_status"] == "approved"
    assert again.loc[0, "reviewed_at"].to_pydatetime() == datetime(2026, 11, 22, 7, 0, tzinfo=UTC)


def test_rows_of_another_partition_are_refused(store):
    with pytest.raises(ManifestError, match="not to manifest/run=r1/part-p001.parquet"):
        write_manifest_partition(store, "r1", "p001", [_row(run_id="r1", partition="p000")])


def test_read_manifest_of_empty_store_has_the_schema(store):
    df = read_manifest(store)
    assert df.empty and list(df.columns) == MANIFEST_SCHEMA.names


def test_duckdb_reads_hive_partitions(tmp_path):
    store = LocalStore(tmp_path)
    for run in ("2026-11-20", "2026-11-21"):
        for part in ("p000", "p001"):
            rows = [
                _row(
                    run_id=run, partition=part, image_id=f"{part}-{i}", qc_status="pass" if i % 3 else "flag"
                )
                for i in range(5)
            ]
            write_manifest_partition(store, run, part, rows)
    pattern = str(tmp_path / "manifest" / "run=*" / "part-*.parquet")
    result = duckdb.sql(
        f"select run_id, qc_status, count(*) as n from read_parquet('{pattern}', hive_partitioning=true) "
        "group by all order by all"
    ).fetchall()
    assert result == [
        ("2026-11-20", "flag", 4),
        ("2026-11-20", "pass", 6),
        ("2026-11-21", "flag", 4),
        ("2026-11-21", "pass", 6),
    ]
    assert len(read_manifest(store)) == 20


def test_manifest_key_refuses_unsafe_run_ids():
    with pytest.raises(RunLayoutError, match="run_id"):
        manifest_key("../x", "p0")
