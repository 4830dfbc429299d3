"""Every standard query runs on two nights of real run tables, answers with the numbers those nights
hold, and gives the same answer through the dashboard's Arrow path and through the DuckDB views the
SQL file documents."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from cli import dashboard_data as data
from storage.store import LocalStore
from tests.monitoring_data import NIGHTS, build_two_nights

ROOT = Path(__file__).resolve().parents[2]
STANDARD = ("nights", "nightly_trend_per_category", "flag_rate_by_category_and_night", "error_codes_over_time",
            "review_latency", "throughput")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("queries") / "store")
    build_two_nights(store)
    return store


@pytest.fixture(scope="module")
def con(store) -> duckdb.DuckDBPyConnection:
    return data.connect(data.read_tables(store), data.night_manifest(store, NIGHTS[1]))


def test_docs_queries_are_the_packaged_file_itself():
    """docs/queries.sql is a link to the SQL the dashboard ships, so the two cannot drift apart."""
    assert (ROOT / "docs" / "queries.sql").resolve() == data.QUERIES_PATH.resolve(), (
        "docs/queries.sql must link to cli/queries.sql (ln -s ../cli/queries.sql docs/queries.sql)")


def test_the_standard_questions_are_all_there():
    assert set(STANDARD) <= set(data.queries())


@pytest.mark.parametrize("name", list(data.load_queries()))
def test_every_query_answers_on_two_nights(con, name):
    result = data.run_query(con, name, run_id=NIGHTS[1])
    assert len(result) > 0
    if "run_id" in result.columns:
        assert set(result["run_id"]) <= set(NIGHTS)


def test_answers_are_the_nights_numbers(con):
    def q(name):
        return data.run_query(con, name, run_id=NIGHTS[1])

    assert q("nights")["run_id"].tolist() == [NIGHTS[1], NIGHTS[0]]
    flags = q("flag_rate_by_category_and_night").set_index(["run_id", "category"])
    assert flags.loc[(NIGHTS[1], "soft-matte"), "flag_rate"] == 0.5
    assert flags.loc[(NIGHTS[1], "soft-matte"), "baseline_flag_rate"] == 0.125
    assert flags.loc[(NIGHTS[1], "soft-matte"), "flag_rate_jump"] == 0.375
    assert pd.isna(flags.loc[(NIGHTS[0], "soft-matte"), "baseline_flag_rate"])
    errors = q("error_codes_over_time")
    assert list(zip(errors["run_id"], errors["error_code"], errors["items"], strict=True)) == [
        (NIGHTS[0], "truncated", 1), (NIGHTS[1], "not_found", 1)]
    latency = q("review_latency").set_index("run_id")
    assert latency.loc[NIGHTS[0], "review_wait_h"] == 2.5 and latency.loc[NIGHTS[0], "reviewers"] == "alice"
    assert pd.isna(latency.loc[NIGHTS[1], "review_wait_h"])
    assert q("throughput")["images_per_s"].round(4).tolist() == [round(23 / 222, 4)] * 2
    trend = q("nightly_trend_per_category")
    assert len(trend) == 6 and trend.groupby("run_id")["items"].sum().tolist() == [24, 24]
    assert q("night_qc_by_category")["qc_flag"].tolist() == [1, 4, 0]
    assert q("night_error_codes")[["category", "error_code"]].values.tolist() == [["warm-studio", "not_found"]]
    flagged = q("flagged_items")
    assert flagged["image_id"].tolist() == ["cris-07", "soft-04", "soft-05", "soft-06", "soft-07"]


def test_the_documented_duckdb_views_give_the_same_answers(con, store):
    """The header of queries.sql tells shell users how to define the views; they must work."""
    header = data.QUERIES_PATH.read_text().split("\n-- name: ")[0]
    text = " ".join(line.removeprefix("--").strip() for line in header.splitlines())
    statements = re.findall(r"CREATE VIEW .*?;", text)
    assert [s.split()[2] for s in statements] == ["runs", "run_categories", "manifest"]
    views = duckdb.connect()
    for statement in statements:
        views.execute(statement.replace("STORE", store.root.as_posix()))
    for name, sql in data.queries().items():
        params = {k: NIGHTS[1] for k in data.query_parameters(sql)}
        expected = data.run_query(con, name, run_id=NIGHTS[1])
        got = views.execute(sql, params).df()
        pd.testing.assert_frame_equal(got[expected.columns], expected, check_dtype=False)


def test_a_query_refuses_to_run_without_its_parameters(con):
    with pytest.raises(ValueError, match=r"needs \['run_id'\]"):
        data.run_query(con, "flagged_items")


def test_duplicate_query_names_are_refused(tmp_path):
    sql = tmp_path / "q.sql"
    sql.write_text("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match="defined twice"):
        data.load_queries(sql)
