"""catalogue_refresh, the nightly entry point: ingest -> learn -> edit partitions -> report -> review
and publish -> summary. refresh_partition is the per-partition entry for GPU work pools.

Under a deployment the review gate suspends the flow run and a resume re-executes it from the top.
Everything before the gate is then reused: ingest, learning, the partitions and the reports are
persisted task results cached for the same refresh flow run (`SAME_REFRESH_RUN`), kept as JSON in the
output store (`resumable`), so they come back `Cached` on whichever worker resumes the run, and the
model is not even loaded. Without them, the instruction cache and the completion markers in the
store still make it a skip.

Partitions larger than `shard_size` are edited in shards (tasks/edit.py `cut_shards`); on a work pool
partitions and shards are packed into runs of at most `shard_size` items (`pack_pieces`), and every
API call of the dispatch passes one `DispatchGate`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dispatch import (
    MAX_RUN_PARAMETER_BYTES,
    check_partition_deployment,
    in_flight,
    pool_runners,
    run_on_pool,
)
from flows.learn import learn_instructions
from flows.review import check_review_policy, review_and_publish
from storage.run_layout import edited_prefix, manifest_prefix
from storage.store import open_store
from tasks.edit import cut_shards, edit_partition, merge_shards, pack_pieces, resumable
from tasks.ingest import catalogue_partitions
from tasks.lease import acquire_run_lease, release_run_lease
from tasks.monitor import record_run
from tasks.params import PartitionJob, PartitionPiece, RefreshConfig
from tasks.report import report_category, write_run_summary


@flow(name="catalogue-refresh", on_completion=[release_run_lease], on_failure=[release_run_lease],
      on_crashed=[release_run_lease], on_cancellation=[release_run_lease])
def catalogue_refresh(config: RefreshConfig) -> dict:
    """Refresh the edited catalogue; returns the run summary (also at runs/<run_id>/summary.json)."""
    run_id = config.run_id or scheduled_run_id()
    check_review_policy(config.review)
    acquire_run_lease(config.output_uri, run_id)
    get_run_logger().info("run %s: %s -> %s", run_id, config.store_uri, config.output_uri)
    timings: dict[str, float] = {}
    kept = resumable(config.output_uri)
    with stage(timings, "ingest"):
        partitions = catalogue_partitions.with_options(**kept)(config.store_uri, config.categories)
    with stage(timings, "learn"):
        instructions = learn_once.with_options(**kept)(config)
    with stage(timings, "edit"):
        jobs = [partition_job(config, run_id, name, items, instructions) for name, items in partitions.items()]
        edited = edit_partitions(jobs, config)
    with stage(timings, "report"):
        categories = sorted({item["category"] for items in partitions.values() for item in items})
        reports = report_category.with_options(**kept).map(
            unmapped(config.store_uri), unmapped(config.output_uri), unmapped(run_id), categories,
            [instructions.get(c, {}) for c in categories], unmapped(config.review.link_expiry_s)).result()
    with stage(timings, "review"):
        review = review_and_publish(config.output_uri, run_id, config.review)
    summary = run_summary(config, run_id, instructions, edited, reports, review, timings)
    write_run_summary(config.output_uri, run_id, summary)
    record_run(config.output_uri, run_id, summary, instructions)
    return summary


@task
def learn_once(config: RefreshConfig) -> dict[str, dict]:
    """The learn-instructions subflow, once per refresh flow run.

    A resumed run gets the first execution's records back instead of loading the model to look the
    instructions up again. Identical records also keep the partitions' and the reports' inputs, and
    so their cache keys, identical (a second lookup would say `learned: False`).
    """
    return learn_instructions(config)


def edit_partitions(jobs: list[PartitionJob], config: RefreshConfig) -> list[dict]:
    """One task per shard (a partition of at most `shard_size` items is one shard) in this process
    by default; with a GPU pool set, the shards are packed into pool runs of at most `shard_size`
    items, as many as the pool's runners or a multiple of them (`pack_pieces`), one task per run.
    Then the partitions cut into shards are merged into one manifest file each. Returns one summary
    per partition.

    Every shard is waited for before a failure is raised, so one bad shard does not stop the others;
    a re-run then only redoes the shards and partitions not yet done. Not a subflow: a subflow's
    parameters (every item of the night) are stored with its flow run, and the API refuses more than
    512 KB of them (about 4,500 items); the shards run on their own task runner, `in_flight` wide.
    """
    kept = resumable(config.output_uri)
    cuts = {job.partition: cut_shards(job, config.shard_size) for job in jobs}
    pieces = [PartitionPiece(job=job, shard=shard) for part in cuts.values() for job, shard in part]
    if config.gpu_work_pool:
        check_partition_deployment(config.partition_deployment, config.gpu_work_pool)
        packs = pack_pieces(pieces, config.shard_size, pool_runners(config), max_bytes=MAX_RUN_PARAMETER_BYTES)
        get_run_logger().info("%d shards packed into %d pool runs of %s items", len(pieces), len(packs),
                              "/".join(str(sum(len(p.job.items) for p in pack)) for pack in packs))
        with ThreadPoolTaskRunner(max_workers=in_flight(config, len(packs))) as runner:
            futures = runner.map(edit_partition_on_pool.with_options(**kept), {
                "pieces": packs, "deployment": unmapped(config.partition_deployment),
                "silence_s": unmapped(config.partition_silence_s),
                "calls_per_s": unmapped(config.dispatch_calls_per_s)})
            wait(futures)
            results = [s for future in futures for s in future.result()]
    else:
        with ThreadPoolTaskRunner(max_workers=in_flight(config, len(pieces))) as runner:
            futures = runner.map(edit_partition.with_options(**kept),
                                 {"job": [p.job for p in pieces], "shard": [p.shard for p in pieces]})
            wait(futures)
            results = [future.result() for future in futures]
    edited = {s["partition"]: s for s in results}
    cut = [job for job in jobs if len(cuts[job.partition]) > 1]
    if cut:
        merged = merge_shards.with_options(**kept).map(cut, [len(cuts[job.partition]) for job in cut]).result()
        edited |= {s["partition"]: s for s in merged}
    summaries = [edited[job.partition] for job in jobs]
    done = sum(not s["skipped"] for s in summaries)
    get_run_logger().info("%d partitions edited (%d shards), %d already done", done, len(pieces),
                          len(summaries) - done)
    return summaries


@flow(name="refresh-partition")
def refresh_partition(pieces: list[PartitionPiece]) -> list[dict]:
    """Edit a pack of partitions and shards, one after another; deployed on the GPU work pool,
    started per pack by catalogue_refresh. Every piece is tried before a failure is raised, so the
    pieces that finished are not sent again.

    The pieces' task results are neither cached nor persisted here: a resumed refresh takes the
    pack's result back in its own process (`edit_partition_on_pool`), and a pack sent again after a
    lost worker skips finished pieces by their markers, so a stored result would never be read."""
    edit = edit_partition.with_options(cache_policy=NO_CACHE, persist_result=False)
    results, failed = [], []
    for piece in pieces:
        try:
            results.append(edit(piece.job, piece.shard))
        except Exception as error:  # noqa: BLE001 - reported below, after the other pieces ran
            get_run_logger().error("%s failed: %s", piece.label, error)
            failed.append(f"{piece.label}: {error}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pieces)} pieces failed: " + "; ".join(failed))
    return results


@task(retries=1, retry_delay_seconds=[30])
def edit_partition_on_pool(pieces: list[PartitionPiece], deployment: str, silence_s: int = 120,
                           calls_per_s: float = 10) -> list[dict]:
    """Run a pack of partitions and shards as one run of the partition deployment and wait for it;
    returns one summary per piece.

    Finished work (a partition marker, a shard file) is not sent to the pool again: a re-run would
    otherwise start (and wait for) a GPU flow run just to skip it. A run whose worker was lost is
    marked Crashed (flows/dispatch.py) and its unfinished pieces are sent again, to whichever worker
    takes them: the new run skips nothing it should not, since only finished work has a marker, and
    rewrites the lost run's outputs into the same keys. Every API call of this goes through the
    process's one `DispatchGate` for `calls_per_s`.
    """
    return run_on_pool(pieces, deployment, silence_s, calls_per_s)


def partition_job(config: RefreshConfig, run_id: str, partition: str, items: list[dict],
                  instructions: dict[str, dict]) -> PartitionJob:
    """The partition's work order, carrying only the instructions its categories need."""
    needed = {item["category"] for item in items}
    return PartitionJob(
        store_uri=config.store_uri, output_uri=config.output_uri, run_id=run_id, partition=partition,
        items=items, instructions={c: r for c, r in instructions.items() if c in needed},
        model_uri=config.model_uri, device=config.device, model_slot=config.model_slot,
        apply=config.apply, qc=config.qc,
    )


def scheduled_run_id() -> str:
    """The flow run's scheduled start in UTC: a retry of the same flow run resumes the same keys."""
    return flow_run.scheduled_start_time.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


@contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - started, 2)


def run_summary(config: RefreshConfig, run_id: str, instructions: dict, edited: list[dict], reports: list[dict],
                review: dict, timings: dict[str, float]) -> dict:
    """Counts, QC distribution, instruction provenance and timings of the run."""
    out = open_store(config.output_uri)
    return {
        "run_id": run_id,
        "store_uri": config.store_uri,
        "output_uri": config.output_uri,
        "edited_uri": out.uri_for(edited_prefix(run_id)),
        "manifest_uri": out.uri_for(manifest_prefix(run_id)),
        "categories": {
            r["category"]: {**r, "instruction": instruction_note(instructions.get(r["category"]))} for r in reports
        },
        "partitions": {"total": len(edited), "done": sum(not s["skipped"] for s in edited),
                       "skipped": sum(s["skipped"] for s in edited)},
        "instructions": {"learned": sum(bool(r.get("learned")) for r in instructions.values()),
                         "reused": sum(r.get("status") == "ok" and not r.get("learned") for r in instructions.values()),
                         "not_learned": sum(r.get("status") != "ok" for r in instructions.values())},
        "review": review,
        "timings_s": {**timings, "total": round(sum(timings.values()), 2)},
    }


def instruction_note(record: dict | None) -> str:
    if record is None:
        return "none: no exemplars"
    if record.get("status") != "ok":
        return f"none: {record['reason']}"
    how = "learned" if record["learned"] else "reused (cache hit)"
    return f"{how}, route {record.get('route', 'instructbrush')}"
