"""The monitoring dashboard's Streamlit script; `retouch dashboard STORE_URI` serves it.

The store comes from the `RETOUCH_DASHBOARD_STORE` environment variable (set by the command), never
from the page, so a visitor cannot point the app at another bucket. Every number on the page comes
from a named query in cli/queries.sql.
"""

from __future__ import annotations

import io
import os

import pandas as pd
import streamlit as st
from PIL import Image

from cli import dashboard_data as data
from cli.dashboard import STORE_ENV
from storage.store import StoreError, open_store

THUMB = 160
MAX_FLAGGED = 24
CACHE_S = 300


@st.cache_resource(ttl=CACHE_S, show_spinner="Reading the run tables")
def tables(store_uri: str) -> dict:
    return data.read_tables(open_store(store_uri))


@st.cache_resource(ttl=CACHE_S, show_spinner="Reading the night's manifest")
def manifest(store_uri: str, run_id: str) -> pd.DataFrame:
    return data.night_manifest(open_store(store_uri), run_id)


@st.cache_data(ttl=CACHE_S, show_spinner=False)
def thumbnail(uri: str) -> bytes | None:
    try:
        image = Image.open(io.BytesIO(data.read_uri(uri)))
    except (StoreError, OSError, ValueError):  # a missing or unreadable image must not take the page down
        return None
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def by_night(frame: pd.DataFrame, value: str, columns: str | None = None) -> pd.DataFrame:
    """A chart-ready frame: one row per night, one column per `columns` value (or just `value`)."""
    if columns is None:
        return frame.set_index("night")[[value]]
    return frame.pivot_table(index="night", columns=columns, values=value, aggfunc="sum")


def night_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Bars per night, labelled by the scheduled minute (a time axis would draw slivers)."""
    return frame.assign(night=frame["night"].dt.strftime("%Y-%m-%d %H:%M"))


def trends(con) -> None:
    st.header("Trends across nights")
    left, right = st.columns(2)
    with left:
        st.subheader("Flag rate by category")
        st.line_chart(by_night(data.run_query(con, "flag_rate_by_category_and_night"), "flag_rate", "category"))
    with right:
        st.subheader("Items per QC status")
        nights = night_labels(data.run_query(con, "nights").rename(columns={"scheduled_at": "night"}))
        st.bar_chart(nights.set_index("night").sort_index()[["qc_pass", "qc_flag", "qc_fail", "qc_error"]])
    left, right = st.columns(2)
    with left:
        st.subheader("Error codes")
        errors = data.run_query(con, "error_codes_over_time")
        if errors.empty:
            st.caption("No error rows in any night.")
        else:
            st.bar_chart(by_night(night_labels(errors), "items", "error_code"))
    with right:
        st.subheader("Throughput (images per second)")
        st.line_chart(by_night(data.run_query(con, "throughput"), "images_per_s"))


def night_summary(run_id: str, night: pd.Series) -> None:
    st.header(f"Night {run_id}")
    cols = st.columns(7)
    for col, (label, value) in zip(cols, [("items", night["items"]), ("pass", night["qc_pass"]),
                                          ("flag", night["qc_flag"]), ("fail", night["qc_fail"]),
                                          ("error", night["qc_error"]), ("published", night["published"]),
                                          ("review", night["review_outcome"] or "-")], strict=True):
        col.metric(label, value)
    if night["flow_run_url"]:
        st.markdown(f"Prefect flow run: [{night['flow_run_id']}]({night['flow_run_url']})")
    elif night["flow_run_id"]:
        st.markdown(f"Prefect flow run: `{night['flow_run_id']}`")


def night_details(con, run_id: str) -> None:
    st.header(f"Night {run_id}: QC, errors and flagged items")
    st.subheader("QC by category")
    by_category = data.run_query(con, "night_qc_by_category", run_id=run_id)
    st.dataframe(by_category.drop(columns=["contact_sheet_uri"]), hide_index=True)
    errors = data.run_query(con, "night_error_codes", run_id=run_id)
    if not errors.empty:
        st.subheader("Error codes")
        st.dataframe(errors, hide_index=True)

    st.subheader("Contact sheets")
    sheets = by_category.dropna(subset=["contact_sheet_uri"])
    if sheets.empty:
        st.caption("No contact sheets for this night.")
    for col, row in zip(st.columns(max(len(sheets), 1)), sheets.itertuples(), strict=False):
        col.markdown(f"[{row.category}]({data.link_for(row.contact_sheet_uri)})")
        with col.expander("before | after"):
            try:
                st.image(data.read_uri(row.contact_sheet_uri))
            except (StoreError, ValueError):  # deleted since the run: the link above says where it was
                st.caption("not readable")

    flagged_items(con, run_id)


def flagged_items(con, run_id: str) -> None:
    flagged = data.run_query(con, "flagged_items", run_id=run_id)
    st.subheader(f"Flagged items ({len(flagged)})")
    if flagged.empty:
        st.caption("QC flagged or failed nothing this night.")
        return
    if len(flagged) > MAX_FLAGGED:
        st.caption(f"The first {MAX_FLAGGED} of {len(flagged)}; the table below lists every one.")
    for row in flagged.head(MAX_FLAGGED).itertuples():
        text, before, after = st.columns([2, 1, 1])
        text.markdown(f"**{row.image_id}** · {row.category} · QC **{row.qc_status}** · review {row.review_status}"
                      f"\n\nSSIM structure {row.qc_ssim_structure:.3f}, edit strength {row.qc_edit_strength:.2f}")
        for col, uri, label in ((before, row.source_uri, "before"), (after, row.output_uri, "after")):
            image = thumbnail(uri) if isinstance(uri, str) else None
            if image is None:
                col.caption(f"{label}: not available")
            else:
                col.image(image, caption=label)
    st.dataframe(flagged, hide_index=True)


def review_view(con) -> None:
    st.header("Review state and latency")
    latency = data.run_query(con, "review_latency")
    waited = latency.dropna(subset=["review_wait_h"])
    if not waited.empty:
        st.bar_chart(waited.set_index("night")[["review_wait_h"]])
    st.dataframe(latency, hide_index=True)


def main() -> None:
    st.set_page_config(page_title="catalogue-retouch monitoring", layout="wide")
    st.title("Catalogue refresh monitoring")
    store_uri = os.environ.get(STORE_ENV)
    if not store_uri:
        st.error(f"No store: start the dashboard with `retouch dashboard STORE_URI` (sets {STORE_ENV}).")
        st.stop()
    st.caption(f"Store: {store_uri}")
    con = data.connect(tables(store_uri))
    nights = data.run_query(con, "nights")
    if nights.empty:
        st.info("No run has recorded its run table here yet (runs/run=<run_id>/run.parquet).")
        st.stop()
    run_id = st.sidebar.selectbox("Night", nights["run_id"].tolist(), index=0)
    if st.sidebar.button("Reload"):
        st.cache_resource.clear()
        st.rerun()
    con.register("manifest", manifest(store_uri, run_id))
    night_summary(run_id, nights.set_index("run_id").loc[run_id])
    trends(con)
    night_details(con, run_id)
    review_view(con)


main()
