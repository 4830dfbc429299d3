"""Dashboard queries at a year's scale: 365 nights x 3,000 items (about 1.1 M manifest rows).

Builds a synthetic output store: one manifest per night written straight from `MANIFEST_SCHEMA`
with pyarrow (1.1 M rows through `manifest_row` would only time Python validation), and every
night's analytics rows written by the real `tasks.monitor.write_run_rows`, which reads the night's
manifest back like `record_run` does. Then it times what the dashboard does: load both tables
through the Store, load one night's manifest, run every query of cli/queries.sql, and render the
whole page with Streamlit's AppTest.

Baseline, measured in the same process: the same per-category flag-rate question answered by
DuckDB scanning all 1.1 M manifest rows (`read_parquet` over every night's files), which is what a
dashboard without the run tables would do.

Usage: python -m benchmarks.dashboard_queries [--nights 365] [--items 3000] [--store DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cli import dashboard_data as data
from storage.manifest import MANIFEST_SCHEMA
from storage.run_layout import manifest_key
from storage.store import LocalStore
from tasks.monitor import write_run_rows

CATEGORIES = ("crisp-product", "soft-matte", "warm-studio", "bg-clean", "shadow-soft", "colour-match")
PARTITIONS = 4
ERROR_CODES = np.array(["truncated", "not_found", "not_an_image", "no_instruction"])
START = datetime(2025, 11, 1, 2, tzinfo=UTC)
TARGET_S = 1.0


def run_id(night: int) -> str:
    return (START + timedelta(days=night)).strftime("%Y%m%dT%H%M%SZ")


def night_table(night: int, items: int, rng: np.random.Generator, store: LocalStore) -> pa.Table:
    """One night's manifest rows: drifting flag rates per category, a few errors, a human review."""
    rid, scheduled = run_id(night), START + timedelta(days=night)
    index = np.arange(items)
    category = np.array(CATEGORIES)[index % len(CATEGORIES)]
    flag_p = 0.05 + 0.04 * np.sin(night / 30 + index % len(CATEGORIES))
    draw = rng.random(items)
    qc = np.where(draw < 0.004, "error", np.where(draw < 0.02, "fail", np.where(draw < 0.02 + flag_p, "flag", "pass")))
    error = qc == "error"
    created = np.datetime64(scheduled.replace(tzinfo=None), "us") + (600 + index * 2) * np.timedelta64(1, "s")
    reviewed = np.datetime64(scheduled.replace(tzinfo=None), "us") + np.timedelta64(int(rng.integers(1, 10)), "h")
    image_id = np.char.add("sku-", index.astype(str))
    partition = np.char.add("p", (index % PARTITIONS).astype(str))
    out_prefix = store.uri_for(f"edited/run={rid}") + "/"
    n = items
    columns = {
        "run_id": [rid] * n, "image_id": image_id, "category": category, "partition": partition,
        "source_uri": np.char.add(store.uri + "/catalogue/", image_id), "output_uri":
        np.where(error, None, np.char.add(out_prefix, np.char.add(image_id, ".png"))),
        "method": ["instructbrush"] * n, "model_id": ["retouch-tiny-ip2p"] * n, "model_sha256": ["0" * 64] * n,
        "instruction_id": category, "instruction_sha256": ["1" * 64] * n, "params": ["{}"] * n,
        "seed": index.astype(np.int64), "qc_ssim_structure": np.where(error, np.nan, rng.uniform(0.7, 1.0, n)),
        "qc_edit_strength": rng.uniform(0, 1, n), "qc_direction_agreement": rng.uniform(0, 1, n),
        "qc_clipped_fraction": rng.uniform(0, 0.01, n), "qc_perceptual_distance": [None] * n,
        "qc_figures": ["{}"] * n, "qc_status": qc,
        "review_status": np.where(qc == "pass", "approved", "rejected"), "reviewer": ["alice"] * n,
        "reviewed_at": np.full(n, reviewed), "published_uri": np.where(qc == "pass", "published", None),
        "error_code": np.where(error, ERROR_CODES[index % len(ERROR_CODES)], None),
        "error": np.where(error, "synthetic", None), "timings": ["{}"] * n,
        "duration_s": np.where(error, np.nan, 2.0), "created_at": created,
    }
    arrays = []
    for field in MANIFEST_SCHEMA:
        values = columns[field.name]
        if field.type == pa.float64():
            arrays.append(pa.array(values, type=field.type, from_pandas=True))
        elif pa.types.is_timestamp(field.type):
            arrays.append(pa.array(values).cast(pa.timestamp("us")).cast(field.type))
        else:
            arrays.append(pa.array(list(values) if isinstance(values, np.ndarray) else values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def build_store(root: Path, nights: int, items: int) -> LocalStore:
    store = LocalStore(root)
    rng = np.random.default_rng(0)
    for night in range(nights):
        rid = run_id(night)
        table = night_table(night, items, rng, store)
        for p in range(PARTITIONS):
            part = table.filter(pa.compute.equal(table["partition"], f"p{p}"))
            path = store.local_path(manifest_key(rid, f"p{p}"))
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path)
        summary = {"run_id": rid, "categories": {}, "partitions": {"total": PARTITIONS, "done": PARTITIONS,
                                                                   "skipped": 0},
                   "review": {"policy": "human", "outcome": "decided", "reviewers": ["alice"],
                              "published": {"created": 0, "unchanged": 0, "replaced": 0}},
                   "timings_s": {"ingest": 2.0, "learn": 1.0, "edit": 6000.0, "report": 30.0, "review": 3600.0}}
        instructions = {c: {"status": "ok", "learned": night == 0, "cache_key": c, "route": "instruct"}
                        for c in CATEGORIES}
        flow = {"flow_run_id": None, "flow_run_url": None, "scheduled_at": START + timedelta(days=night)}
        write_run_rows(store, rid, summary, instructions, flow)
    return store


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(median s, max s, last result) over `repeat` calls."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--store", type=Path, default=None, help="reuse or build the store here (default: temp)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    root = args.store or Path(tempfile.mkdtemp(prefix="dashboard-bench-")) / "store"
    started = time.perf_counter()
    if (root / "runs").exists():
        store = LocalStore(root)
        print(f"reusing {root}")
    else:
        store = build_store(root, args.nights, args.items)
        print(f"built {args.nights} nights x {args.items} items in {time.perf_counter() - started:.0f} s")

    rows: list[tuple[str, float, float, str]] = []
    load_med, load_max, tables = timed(lambda: data.read_tables(store), args.repeat)
    rows.append(("load run + category tables (Store -> Arrow)", load_med, load_max,
                 f"{tables['runs'].num_rows} + {tables['run_categories'].num_rows} rows"))
    latest = tables["runs"].column("run_id")[-1].as_py()
    man_med, man_max, manifest = timed(lambda: data.night_manifest(store, latest), args.repeat)
    rows.append(("load one night's manifest", man_med, man_max, f"{len(manifest)} rows"))
    con = data.connect(tables, manifest)
    for name in data.queries():
        med, worst, result = timed(lambda name=name: data.run_query(con, name, run_id=latest), args.repeat)
        rows.append((f"query {name}", med, worst, f"{len(result)} rows"))

    duck = duckdb.connect()
    manifest_rows = duck.execute(f"SELECT count(*) FROM read_parquet('{root.as_posix()}/manifest/*/*.parquet')"
                                 ).fetchone()[0]
    baseline_sql = (f"SELECT run_id, category, avg((qc_status = 'flag')::INT) AS flag_rate "
                    f"FROM read_parquet('{root.as_posix()}/manifest/*/*.parquet') GROUP BY ALL")
    base_med, base_max, _ = timed(lambda: duck.execute(baseline_sql).df(), args.repeat)
    fast = next(r for r in rows if r[0] == "query flag_rate_by_category_and_night")

    os.environ["RETOUCH_DASHBOARD_STORE"] = store.uri
    from streamlit.testing.v1 import AppTest

    app_path = str(Path(data.__file__).with_name("dashboard_app.py"))
    page_med, page_max, app = timed(lambda: AppTest.from_file(app_path, default_timeout=300).run(), 3)
    rows.append(("whole page, first render (AppTest, cached tables after the 1st)", page_med, page_max,
                 "ok" if not app.exception else f"exception: {app.exception[0].value}"))

    print(f"\n{args.nights} nights, {manifest_rows:,} manifest rows, {os.cpu_count()} cores\n")
    print(f"{'step':<66}{'median s':>10}{'max s':>9}  result")
    for name, med, worst, note in rows:
        flag = "" if worst <= TARGET_S or not name.startswith("query") else "  OVER 1 s"
        print(f"{name:<66}{med:>10.3f}{worst:>9.3f}  {note}{flag}")
    print(f"\nbaseline: flag rate by category and night from the full manifest (DuckDB read_parquet): "
          f"median {base_med:.3f} s, max {base_max:.3f} s; run tables are {base_med / fast[1]:.0f}x faster")
    slow = [r[0] for r in rows if r[0].startswith("query") and r[2] > TARGET_S]
    print("every query within 1 s" if not slow else f"over 1 s: {', '.join(slow)}")


if __name__ == "__main__":
    main()
