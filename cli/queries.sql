-- The standard questions about the nightly refresh, as DuckDB SQL.
--
-- This file ships inside the `cli` package (cli/queries.sql): the dashboard runs these exact
-- queries, and docs/queries.sql is a copy that the tests keep equal. Each query starts with a
-- `-- name: <id>` line; `$run_id` is a named parameter.
--
-- Relations (docs/monitoring.md describes every column):
--   runs            the run table, one row per run             runs/run=<run_id>/run.parquet
--   run_categories  one row per run and category               runs/run=<run_id>/categories.parquet
--   manifest        one row per item (only `flagged_items`)    manifest/run=<run_id>/part-*.parquet
--
-- In the DuckDB shell, from a local output store (STORE is its folder):
--   CREATE VIEW runs AS SELECT * FROM read_parquet('STORE/runs/run=*/run.parquet', union_by_name = true);
--   CREATE VIEW run_categories AS
--     SELECT * FROM read_parquet('STORE/runs/run=*/categories.parquet', union_by_name = true);
--   CREATE VIEW manifest AS SELECT * FROM read_parquet('STORE/manifest/run=*/part-*.parquet');
--   SET VARIABLE run_id = '20261102T020000Z';  -- then write getvariable('run_id') for $run_id
-- On S3 the dashboard reads the same files through pyarrow (see docs/monitoring.md).

-- name: nights
-- One line per night, newest first: what ran, how it ended, where to look in Prefect.
SELECT
    run_id,
    scheduled_at,
    finished_at,
    items,
    qc_pass,
    qc_flag,
    qc_fail,
    qc_error,
    qc_flag / nullif(items, 0) AS flag_rate,
    review_outcome,
    review_pending,
    published,
    instructions_learned,
    instructions_reused,
    instructions_failed,
    flow_run_id,
    flow_run_url
FROM runs
ORDER BY scheduled_at DESC, run_id DESC;

-- name: nightly_trend_per_category
-- Items and QC outcome of every category, night by night.
SELECT
    r.scheduled_at AS night,
    c.run_id,
    c.category,
    c.items,
    c.qc_pass,
    c.qc_flag,
    c.qc_fail,
    c.qc_error,
    c.qc_pass / nullif(c.items, 0) AS pass_rate,
    c.qc_ssim_structure_mean,
    c.qc_edit_strength_mean,
    c.instruction_status,
    c.instruction_route
FROM run_categories AS c
JOIN runs AS r USING (run_id)
ORDER BY night, c.category;

-- name: flag_rate_by_category_and_night
-- Flag rate per category and night, against the median of the category's previous 14 nights
-- (the same baseline as the event's flag_rate_jumped).
SELECT
    night,
    run_id,
    category,
    items,
    flag_rate,
    baseline_flag_rate,
    flag_rate - baseline_flag_rate AS flag_rate_jump
FROM (
    SELECT
        r.scheduled_at AS night,
        c.run_id,
        c.category,
        c.items,
        c.qc_flag / nullif(c.items, 0) AS flag_rate,
        median(c.qc_flag / nullif(c.items, 0)) OVER (
            PARTITION BY c.category ORDER BY r.scheduled_at ROWS BETWEEN 14 PRECEDING AND 1 PRECEDING
        ) AS baseline_flag_rate
    FROM run_categories AS c
    JOIN runs AS r USING (run_id)
)
ORDER BY night, category;

-- name: error_codes_over_time
-- Items per error code and night (all categories).
SELECT
    r.scheduled_at AS night,
    c.run_id,
    e.error_code,
    sum(e.items)::BIGINT AS items
FROM run_categories AS c
JOIN runs AS r USING (run_id)
CROSS JOIN unnest(c.error_codes) AS u(e)
GROUP BY night, c.run_id, e.error_code
ORDER BY night, items DESC, e.error_code;

-- name: review_latency
-- How long each run waited for its review: first pause of the gate to the last decision.
SELECT
    scheduled_at AS night,
    run_id,
    review_policy,
    review_outcome,
    array_to_string(reviewers, ', ') AS reviewers,
    review_opened_at,
    review_decided_at,
    review_wait_s / 3600 AS review_wait_h,
    review_pending,
    review_approved,
    review_rejected,
    review_expired
FROM runs
ORDER BY night;

-- name: throughput
-- Edited images per second (manifest wall time) and the stage timings of each run.
SELECT
    scheduled_at AS night,
    run_id,
    images_edited,
    edit_wall_s,
    images_per_s,
    ingest_s,
    learn_s,
    edit_s,
    report_s,
    review_s,
    total_s
FROM runs
ORDER BY night;

-- name: night_qc_by_category
-- One night's QC, review and instruction per category.
SELECT
    category,
    items,
    qc_pass,
    qc_flag,
    qc_fail,
    qc_error,
    qc_flag / nullif(items, 0) AS flag_rate,
    review_pending,
    review_approved,
    review_rejected,
    review_expired,
    published,
    review_wait_s / 3600 AS review_wait_h,
    instruction_status,
    instruction_route,
    contact_sheet_uri
FROM run_categories
WHERE run_id = $run_id
ORDER BY category;

-- name: night_error_codes
-- One night's error codes per category.
SELECT
    c.category,
    e.error_code,
    e.items
FROM run_categories AS c
CROSS JOIN unnest(c.error_codes) AS u(e)
WHERE c.run_id = $run_id
ORDER BY e.items DESC, c.category, e.error_code;

-- name: flagged_items
-- One night's items that QC flagged or failed, with what a reviewer needs to look at them.
SELECT
    image_id,
    category,
    partition,
    qc_status,
    qc_ssim_structure,
    qc_edit_strength,
    qc_direction_agreement,
    review_status,
    reviewer,
    source_uri,
    output_uri
FROM manifest
WHERE run_id = $run_id AND qc_status IN ('flag', 'fail')
ORDER BY category, qc_status, image_id;
