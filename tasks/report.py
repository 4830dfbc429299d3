"""What the data team and the reviewer see: per-category contact sheets and Prefect artifacts with
stable keys (so the UI shows each category's history), the review gate's description, and the run
summary in the store.

Stored records (the run summary, task results) name contact sheets by store key. A link is presigned
only where it is shown (artifacts, the Resume form, `retouch review list`), with a short lifetime
(`ReviewConfig.link_expiry_s`, default one hour): anyone holding a presigned URL can read the object
until it expires, and summaries and artifacts outlive any review.
"""

from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
from PIL import Image, ImageDraw
from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from storage.images import encode_png, load_image
from storage.keys import InvalidKeyError
from storage.manifest import read_manifest
from storage.run_layout import contact_sheet_key, key_for_uri, summary_key
from storage.store import Store, open_store

SHEET_ITEMS = 8
THUMB = 160
TABLE_ROWS = 500
DEFAULT_LINK_EXPIRY_S = 3600
MAX_IDS_IN_DESCRIPTION = 50
QC_COLUMNS = ["image_id", "partition", "qc_status", "qc_ssim_structure", "qc_edit_strength",
              "qc_direction_agreement", "qc_clipped_fraction", "error_code"]


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join("".join(c if c.isalnum() else "-" for c in part.lower()) for part in parts)


def route_caption(category: str, instruction: dict) -> str:
    """`category: route lut+instructbrush (held out: lut 38.1 dB, ...)`, for sheets and summaries."""
    route = instruction.get("route") or "instructbrush"
    scores = instruction.get("route_scores") or {}
    held = ", ".join(f"{name} {figures['psnr']:.1f} dB / dE {figures['deltae2000_mean']:.1f}"
                     for name, figures in scores.items())
    if instruction.get("light_field_grid"):
        route += " (LUT with a light field)"
    return f"{category}: route {route}" + (f" (held out: {held})" if held else "")


def _qc_lines(row) -> list[str]:
    figures = json.loads(row.qc_figures or "{}")
    lines = [f"QC {row.qc_status}"]
    if row.qc_ssim_structure is not None and row.qc_ssim_structure == row.qc_ssim_structure:
        lines.append(f"SSIM {row.qc_ssim_structure:.2f}")
    if figures.get("deltae2000_mean") is not None:
        lines.append(f"dE {figures['deltae2000_mean']:.1f} / p95 {figures.get('deltae2000_p95') or 0:.1f}")
    if figures.get("skin_outliers") is not None:
        lines.append(f"skin off-tone {figures['skin_outliers']:.0%}")
    lines += [str(reason)[:28] for reason in figures.get("reasons", [])[:2]]
    return lines


def contact_sheet(store: Store, out: Store, rows: pd.DataFrame, title: str) -> Image.Image:
    """A compact grid for a reviewer's first look at a category: a title (category, route and its
    held-out figures), then one line per item: before | after | QC figures, each line as tall as its
    thumbnails."""
    pad, text_w, header = 4, 150, 14
    lines = []
    for row in rows.itertuples():
        thumbs = []
        for where, uri in ((store, row.source_uri), (out, row.output_uri)):
            thumb = load_image(where, key_for_uri(where, uri))
            thumb.thumbnail((THUMB, THUMB))
            thumbs.append(thumb)
        lines.append((row, thumbs, max(t.height for t in thumbs)))
    width = 2 * (THUMB + pad) + text_w + pad
    height = 2 * header + pad + sum(h + pad + 12 for _, _, h in lines)
    sheet = Image.new("RGB", (max(width, 6 * len(title) + 2 * pad), height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 2), title, fill="black")
    for column, label in enumerate(("before", "after", "QC")):
        draw.text((pad + column * (THUMB + pad), header + 2), label, fill="dimgray")
    top = 2 * header + pad
    for row, thumbs, line_height in lines:
        draw.text((pad, top), str(row.image_id), fill="black")
        for column, thumb in enumerate(thumbs):
            sheet.paste(thumb, (pad + column * (THUMB + pad), top + 12))
        colour = {"pass": "darkgreen", "flag": "darkorange", "fail": "firebrick"}.get(row.qc_status, "black")
        for n, text in enumerate(_qc_lines(row)):
            draw.text((pad + 2 * (THUMB + pad), top + 12 + n * 12), text, fill=colour if n == 0 else "black")
        top += line_height + pad + 12
    return sheet


@task(retries=2, retry_delay_seconds=[2, 10])
def report_category(store_uri: str, output_uri: str, run_id: str, category: str, instruction: dict,
                    link_expiry_s: int = DEFAULT_LINK_EXPIRY_S) -> dict:
    """Contact sheet, QC table and summary artifacts of one category; returns its QC counts and the
    contact sheet's key (a key, never a presigned URL: the result is persisted)."""
    store, out = open_store(store_uri), open_store(output_uri)
    manifest = read_manifest(out, run_id)
    rows = manifest[manifest["category"] == category].sort_values("image_id")
    counts = {str(k): int(v) for k, v in rows["qc_status"].value_counts().sort_index().items()}
    edited = rows[rows["output_uri"].notna()]
    sheet_url = sheet_key = None
    if len(edited):
        sheet_key = contact_sheet_key(run_id, category)
        sheet = contact_sheet(store, out, edited.head(SHEET_ITEMS), route_caption(category, instruction))
        out.put_bytes(sheet_key, encode_png(sheet), content_type="image/png")
        sheet_url = out.presigned_url(sheet_key, expires_s=link_expiry_s)
        create_image_artifact(image_url=sheet_url, key=artifact_key("contact-sheet", category),
                              description=f"{category}: before | after, first {SHEET_ITEMS} items of run {run_id} "
                              f"(link valid {link_expiry_s // 60} min; `retouch review list` prints a fresh one)")
    table = rows[QC_COLUMNS].head(TABLE_ROWS).astype(object).where(rows[QC_COLUMNS].head(TABLE_ROWS).notna(), None)
    create_table_artifact(table=table.to_dict("records"), key=artifact_key("qc", category),
                          description=f"{category}: QC figures of run {run_id}")
    create_markdown_artifact(markdown=category_markdown(category, run_id, counts, edited, instruction, sheet_url),
                             key=artifact_key("summary", category), description=f"{category}: run {run_id}")
    return {"category": category, "items": len(rows), "qc_status": counts, "contact_sheet": sheet_key}


def category_markdown(category: str, run_id: str, counts: dict, edited: pd.DataFrame, instruction: dict,
                      sheet_url: str | None) -> str:
    means = edited[["qc_ssim_structure", "qc_edit_strength", "qc_direction_agreement"]].mean()
    source = "learned this run" if instruction.get("learned") else "reused from cache"
    lines = [
        f"# {category} (run `{run_id}`)", "",
        f"- instruction: `{instruction.get('cache_key', '-')[:12]}` ({source}, {instruction.get('pairs', 0)} pairs)"
        if instruction.get("status") == "ok" else f"- instruction: none ({instruction.get('reason', 'no exemplars')})",
        f"- {route_caption(category, instruction)}" if instruction.get("status") == "ok" else "- route: none",
        "- QC: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        f"- mean SSIM structure {means.iloc[0]:.3f}, edit strength {means.iloc[1]:.2f}, "
        f"direction agreement {means.iloc[2]:.2f}" if len(edited) else "- nothing edited",
    ]
    if sheet_url:
        lines.append(f"- [contact sheet]({sheet_url})")
    return "\n".join(lines) + "\n"


@task(retries=2, retry_delay_seconds=[2, 10])
def write_run_summary(output_uri: str, run_id: str, summary: dict) -> str:
    """`runs/<run_id>/summary.json` plus the run's markdown artifact; returns the summary's URI."""
    out = open_store(output_uri)
    key = summary_key(run_id)
    out.put_bytes(key, json.dumps(summary, indent=2, sort_keys=True, default=str).encode(),
                  content_type="application/json")
    create_markdown_artifact(markdown=run_markdown(summary), key="run-summary",
                             description=f"catalogue refresh {run_id}")
    return out.uri_for(key)


def run_markdown(summary: dict) -> str:
    lines = [f"# Catalogue refresh `{summary['run_id']}`", "",
             "| category | items | pass | flag | fail | error | instruction |", "|---|---:|---:|---:|---:|---:|---|"]
    for category, info in sorted(summary["categories"].items()):
        qc = info["qc_status"]
        lines.append(f"| {category} | {info['items']} | " + " | ".join(str(qc.get(s, 0)) for s in
                     ("pass", "flag", "fail", "error")) + f" | {info['instruction']} |")
    parts, review = summary["partitions"], summary["review"]
    lines += [
        "",
        f"Partitions: {parts['done']} edited, {parts['skipped']} already done.",
        f"Review: {review.get('outcome')}, statuses {review.get('review_status')}.",
        f"Timings (s): {summary['timings_s']}.",
    ]
    return "\n".join(lines) + "\n"


@task
def report_exemplar_problems(exemplars: list[dict]) -> int:
    """One table of every pair left out of learning, so the retoucher can fix them; returns the count."""
    problems = [{"category": e["category"], **p} for e in exemplars for p in e["problems"]]
    if problems:
        create_table_artifact(table=problems, key="exemplar-problems",
                              description="Exemplar pairs left out of learning, and why")
    return len(problems)


def describe(store_uri: str, run_id: str, summary: dict, *, deadline: datetime,
             link_expiry_s: int = DEFAULT_LINK_EXPIRY_S) -> str:
    """Markdown shown above the Resume form: what waits, how QC judged it, where to look."""
    store = open_store(store_uri)
    lines = [
        f"## Review run `{run_id}`",
        "",
        (
            f"**{summary['total']}** items wait for a decision (deadline {deadline:%Y-%m-%d %H:%M} UTC; "
            "afterwards they expire and nothing is published)."
        ),
        "",
        "| category | pass | flag | fail | error | contact sheet |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for category, counts in sorted(summary["by_category"].items()):
        sheet = "-"
        try:
            key = contact_sheet_key(run_id, category)
            if store.exists(key):
                sheet = f"[{category}.png]({store.presigned_url(key, expires_s=link_expiry_s)})"
        except InvalidKeyError:
            pass
        row = " | ".join(str(counts.get(s, 0)) for s in ("pass", "flag", "fail", "error"))
        lines.append(f"| {category} | {row} | {sheet} |")
    flagged = summary["flagged_ids"]
    if flagged:
        lines += ["", "QC flagged or failed (approve explicitly with *approve_ids* if they look right):"]
        for category, ids in sorted(flagged.items()):
            more = (
                f" and {len(ids) - MAX_IDS_IN_DESCRIPTION} more" if len(ids) > MAX_IDS_IN_DESCRIPTION else ""
            )
            lines.append(f"- {category}: {', '.join(ids[:MAX_IDS_IN_DESCRIPTION])}{more}")
    lines += [
        "",
        (
            "Items in scope and not approved are rejected; error items are never published. "
            f"Contact-sheet links are valid {link_expiry_s // 60} min; `retouch review list` prints fresh ones. "
            f"CLI: `retouch review approve {run_id} --all-passing --reviewer NAME`."
        ),
    ]
    return "\n".join(lines)
