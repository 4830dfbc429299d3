"""Edit one catalogue partition: load, apply the category's instruction, check, write, record.

One task per partition keeps the fan-out coarse. Keys and seeds are deterministic in (run, item,
category), the manifest partition is written after every output and the completion marker last, so
a partition interrupted anywhere is simply redone into the same keys, and a finished one is skipped.

Two layers make a finished partition cost nothing the second time. Inside one refresh flow run
(a suspended run resumed after review re-executes from the top) the task result is persisted and
cached (`SAME_REFRESH_RUN`), so Prefect returns it as `Cached` without touching the store or the
model. Across flow runs (a crash re-run of the same run id), or when the cached result cannot be
read, the completion marker in the store makes the task a skip.

The results live in the output store itself (`StoreResults`, under `prefect-results/`), so a run
resumed on another worker, with another PREFECT_HOME, finds them; they are JSON, and a record that
asks for any other serializer, or for a Python class to be imported on load, is refused (a cache
miss), so whoever can write to the store cannot make a resume run code.

A partition of more than `shard_size` items is cut into shards (`cut_shards`), each edited as its own
task or pool run; a shard writes its rows to `_shards/` with the outputs, and `merge_shards` writes
the partition's one manifest file and its marker once every shard is done. A finished shard is
skipped like a finished partition, so a crash costs at most the shards in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime
from itertools import groupby

from PIL import Image
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.runtime import flow_run
from prefect.serializers import Serializer
from prefect.settings import get_current_settings

from editing.instruct import LearnedInstruction, apply_instruction, load_instruction
from editing.instruct.apply import expected_output, qc_thresholds
from editing.models import LoadedModel
from editing.quality import assess
from editing.seeds import item_seed
from storage.images import ImageError, encode_png, load_image
from storage.keys import InvalidKeyError
from storage.manifest import keep_recorded_verdicts, manifest_row, write_manifest_partition
from storage.run_layout import done_key, finished_work_prefix, output_key, result_key, shard_key
from storage.store import (
    AccessDeniedError,
    NotFoundError,
    Store,
    StoreUnavailableError,
    UnsafePathError,
    open_store,
)
from tasks.models import cached_model, model_step
from tasks.params import PartitionJob, PartitionPiece

METHOD = "instructbrush"
_INSTRUCTIONS: dict[tuple[str, str], LearnedInstruction] = {}


class RootFlowRun(CachePolicy):
    """Key on the top-level flow run, so a result is reused only inside the same refresh.

    Prefect's own RUN_ID keys on the innermost flow run; a subflow gets a new flow run id when the
    suspended parent re-executes, which would miss every result cached inside it.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict, flow_parameters: dict, **kwargs) -> str | None:
        if task_ctx is None:
            return None
        # Outside any flow run the task run's own id: a key that is never shared.
        return str(flow_run.root_flow_run_id or task_ctx.task_run.id)


# Reused within one refresh flow run (resume after review, retry), never by a later run.
SAME_REFRESH_RUN = INPUTS + TASK_SOURCE + RootFlowRun()
# The options of every task a resumed refresh takes back from result storage. JSON, not pickle: the
# results are plain dicts, and a pickle in a shared result folder would run code when it is loaded.
RESUMABLE = {"cache_policy": SAME_REFRESH_RUN, "persist_result": True, "result_serializer": "json"}
# The one serializer a stored result may name (the defaults of Prefect's JSON serializer).
_JSON_RECORD = Serializer(type="json").model_dump(mode="json")


class StoreResults(WritableFileSystem):
    """Prefect result storage in a catalogue store (local folder or S3, through storage.store), under
    `prefect-results/`: every worker that can write the run's outputs can read its results back.

    Reading refuses a record that is not plain JSON: another serializer (pickle runs code when it is
    loaded) or Prefect's `__class__` / `__exc_type__` objects (their decoder imports the named module).
    Prefect takes a refused record for a cache miss and runs the task again.
    """

    _block_type_name = "Retouch Store Results"
    root: str

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        data = open_store(self.root).get_bytes(result_key(path))
        try:
            record = json.loads(data)
            plain = record["metadata"]["serializer"] == _JSON_RECORD and not _has_objects(json.loads(record["result"]))
        except (ValueError, KeyError, TypeError):
            plain = False
        if not plain:
            raise ValueError(f"{self.root}: result {path} is not a plain JSON record; not loaded")
        return data

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        open_store(self.root).put_bytes(result_key(path), content, content_type="application/json")
        return path

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def _has_objects(value: object) -> bool:
    if isinstance(value, dict):
        return "__class__" in value or "__exc_type__" in value or any(_has_objects(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_objects(v) for v in value)
    return False


def resumable(output_uri: str) -> dict:
    """The task options of everything a resumed refresh takes back: RESUMABLE, with the results in the
    run's output store, the one place every worker of the run shares."""
    return {**RESUMABLE, "result_storage": store_results(output_uri)}


_SAVED: dict[tuple[str | None, str], StoreResults] = {}
_SAVED_LOCK = threading.Lock()


def store_results(output_uri: str) -> StoreResults:
    """The result storage of `output_uri`, saved as a block on the Prefect server (Prefect refuses an
    unsaved one) under a name derived from the root, once per process and server."""
    server = get_current_settings().api.url
    with _SAVED_LOCK:
        if (server, output_uri) not in _SAVED:
            block = StoreResults(root=output_uri)
            block.save(f"retouch-results-{hashlib.sha256(output_uri.encode()).hexdigest()[:16]}", overwrite=True)
            _SAVED[server, output_uri] = block
        return _SAVED[server, output_uri]


# Failures of the store itself, not of one item: the partition fails and is retried as a whole.
_NOT_ITEM_ERRORS = (StoreUnavailableError, AccessDeniedError)


@task(retries=1, retry_delay_seconds=[10], **RESUMABLE)
def edit_partition(job: PartitionJob, shard: int | None = None) -> dict:
    """Edit every item of the partition, or of one shard of it (`job.items` is then the shard's slice),
    unless a previous attempt finished it; returns its summary."""
    out = open_store(job.output_uri)
    if (done := finished(job, shard)) is not None:
        return done
    started = time.monotonic()
    rows = []
    for category, items in groupby(sorted(job.items, key=lambda i: i["category"]), key=lambda i: i["category"]):
        rows += edit_category(job, category, list(items))
    if shard is not None:
        return write_shard(out, job, shard, rows, time.monotonic() - started)
    marker = done_key(job.run_id, job.partition)
    # A rewrite (lost marker, reused run id) must not send reviewed rows back to pending.
    rows = keep_recorded_verdicts(out, job.run_id, job.partition, rows)
    write_manifest_partition(out, job.run_id, job.partition, rows)
    summary = partition_summary(job.partition, rows, time.monotonic() - started)
    out.put_bytes(marker, json.dumps(summary, sort_keys=True).encode(), content_type="application/json")
    get_run_logger().info("partition %s: %d items, QC %s, %.1f s", job.partition, summary["items"],
                          summary["qc_status"], summary["duration_s"])
    return {**summary, "skipped": False}


def write_shard(out: Store, job: PartitionJob, shard: int, rows: list[dict], duration_s: float) -> dict:
    """Keep a shard's rows until `merge_shards` writes its partition's manifest file."""
    summary = partition_summary(job.partition, rows, duration_s)
    record = json.dumps({"summary": summary, "rows": rows}, default=datetime.isoformat)
    out.put_bytes(shard_key(job.run_id, job.partition, shard), record.encode(), content_type="application/json")
    get_run_logger().info("partition %s shard %d: %d items, %.1f s", job.partition, shard, summary["items"],
                          summary["duration_s"])
    return {**summary, "shard": shard, "skipped": False}


def cut_shards(job: PartitionJob, shard_size: int) -> list[tuple[PartitionJob, int | None]]:
    """The partition's work orders: the partition itself (shard None) if it has at most `shard_size`
    items, else slices of at most `shard_size` items in image id order, numbered from 0.

    The order is fixed by the items alone, so a re-run of the same run id cuts the same shards; a
    shard file whose items differ from its slice (shard_size changed in between) is redone.
    """
    if len(job.items) <= shard_size:
        return [(job, None)]
    items = sorted(job.items, key=lambda item: item["image_id"])
    return [(job.model_copy(update={"items": items[start:start + shard_size]}), n)
            for n, start in enumerate(range(0, len(items), shard_size))]


def pack_pieces(pieces: list[PartitionPiece], max_items: int, runners: int,
                max_bytes: int | None = None) -> list[list[PartitionPiece]]:
    """Pieces (whole partitions and shards, never split) packed into the fewest pool runs such that
    every run carries at most `max_items` items (and, if given, at most `max_bytes` of JSON
    parameters), with the number of runs a multiple of `runners` (the workers that take them) so
    that each gets the same share; no more runs than pieces.

    Each run's start costs seconds to tens of seconds (a fresh process, imports, the pull step), so a
    night of many small partitions would otherwise spend more time starting runs than editing.
    Pieces go largest first to the least loaded run, which keeps the runs within one piece of
    each other.
    """
    if not pieces:
        return []
    if max_items < 1 or runners < 1:
        raise ValueError(f"max_items and runners must be >= 1, got {max_items} and {runners}")
    sizes = [len(piece.job.items) for piece in pieces]
    weights = [len(piece.model_dump_json()) for piece in pieces] if max_bytes else [0] * len(pieces)
    if max_bytes and max(weights) > max_bytes:
        piece = pieces[weights.index(max(weights))]
        raise ValueError(f"{piece.label}: {len(piece.job.items)} items make {max(weights) // 1000} KB of "
                         f"flow-run parameters, over the {max_bytes // 1000} KB a pool run may carry; lower shard_size")
    runs = math.ceil(math.ceil(sum(sizes) / max_items) / runners) * runners
    order = sorted(range(len(pieces)), key=lambda i: (-sizes[i], i))
    while True:
        runs = min(runs, len(pieces))
        packs: list[list[int]] = [[] for _ in range(runs)]
        load, heft = [0] * runs, [0] * runs
        for i in order:
            target = min(range(runs), key=lambda r: (load[r], r))
            packs[target].append(i)
            load[target] += sizes[i]
            heft[target] += weights[i]
        fits = max(load) <= max_items and (not max_bytes or max(heft) <= max_bytes)
        if fits or runs == len(pieces):
            return [[pieces[i] for i in sorted(pack)] for pack in packs]
        runs += runners


def finished(job: PartitionJob, shard: int | None = None) -> dict | None:
    """The summary of finished work (`skipped: True`): the partition's marker, else the shard's file if
    it holds exactly the shard's items; None if the work is still to do."""
    out = open_store(job.output_uri)
    marker = done_key(job.run_id, job.partition)
    if out.exists(marker):
        return {**json.loads(out.get_bytes(marker)), "skipped": True}
    if shard is None or not out.exists(key := shard_key(job.run_id, job.partition, shard)):
        return None
    record = json.loads(out.get_bytes(key))
    if sorted(row["image_id"] for row in record["rows"]) != sorted(item["image_id"] for item in job.items):
        return None
    return {**record["summary"], "shard": shard, "skipped": True}


def finished_pieces(pieces: list[PartitionPiece]) -> dict[int, dict]:
    """`finished` for many pieces, by their index in `pieces`: each run's markers and shard files are
    listed once (one LIST per 1,000 keys) and only the pieces found there are read, instead of one or
    two HEAD requests per piece; a fresh night's pack of hundreds of pieces costs one request."""
    listed: dict[tuple[str, str], set[str]] = {}
    done = {}
    for i, piece in enumerate(pieces):
        job = piece.job
        if (job.output_uri, job.run_id) not in listed:
            out = open_store(job.output_uri)
            listed[job.output_uri, job.run_id] = set(out.list(finished_work_prefix(job.run_id)))
        keys = listed[job.output_uri, job.run_id]
        maybe = done_key(job.run_id, job.partition) in keys or (
            piece.shard is not None and shard_key(job.run_id, job.partition, piece.shard) in keys)
        if maybe and (summary := finished(job, piece.shard)) is not None:
            done[i] = summary
    return done


@task(retries=1, retry_delay_seconds=[10], **RESUMABLE)
def merge_shards(job: PartitionJob, shards: int) -> dict:
    """Write the partition's manifest file from its shards' rows, then its marker; returns its summary.

    Every shard must be done: a missing one is an error, not a smaller partition.
    """
    if (done := finished(job)) is not None:
        return done
    out = open_store(job.output_uri)
    records = []
    for shard in range(shards):
        key = shard_key(job.run_id, job.partition, shard)
        if not out.exists(key):
            raise RuntimeError(f"partition {job.partition}: shard {shard} of {shards} has no result")
        records.append(json.loads(out.get_bytes(key)))
    rows = [row for record in records for row in record["rows"]]
    if sorted(row["image_id"] for row in rows) != sorted(item["image_id"] for item in job.items):
        raise RuntimeError(f"partition {job.partition}: its shards' rows do not match its items")
    rows = keep_recorded_verdicts(out, job.run_id, job.partition, rows)
    write_manifest_partition(out, job.run_id, job.partition, rows)
    summary = partition_summary(job.partition, rows, sum(r["summary"]["duration_s"] for r in records))
    out.put_bytes(done_key(job.run_id, job.partition), json.dumps(summary, sort_keys=True).encode(),
                  content_type="application/json")
    get_run_logger().info("partition %s: %d shards merged, %d items, QC %s", job.partition, shards,
                          summary["items"], summary["qc_status"])
    return {**summary, "skipped": False}


def partition_summary(partition: str, rows: list[dict], duration_s: float) -> dict:
    qc = Counter(row["qc_status"] for row in rows)
    return {"partition": partition, "items": len(rows), "qc_status": dict(sorted(qc.items())),
            "by_category": dict(sorted(Counter(row["category"] for row in rows).items())),
            "duration_s": round(duration_s, 3)}


def edit_category(job: PartitionJob, category: str, items: list[dict]) -> list[dict]:
    """Manifest rows of one category's items in this partition; a bad image costs one error row."""
    bad_rows = [error_row(job, item, "invalid_key", item["index_error"]) for item in items if item.get("index_error")]
    items = [item for item in items if not item.get("index_error")]
    if not items:
        return bad_rows
    record = job.instructions.get(category)
    if record is None or record.get("status") != "ok":
        reason = (record or {}).get("reason", f"no exemplars for category {category!r}")
        return bad_rows + [error_row(job, item, "no_instruction", reason) for item in items]
    store, out = open_store(job.store_uri), open_store(job.output_uri)
    # A LUT-only instruction never runs the model, so its categories do not even load it.
    model = cached_model(job.model_uri, job.device, job.apply.dtype) if record.get("route") != "lut" else None
    instruction = cached_instruction(out, record, model)
    rows = bad_rows
    # Batch by batch, so a partition of large photos never holds more than one batch in memory.
    for loaded, failed in loaded_batches(job, store, items):
        rows += failed
        if not loaded:
            continue
        seeds = [item_seed(job.run_id, item["image_id"], category) for item, _, _ in loaded]
        started = time.monotonic()
        # The LUT alone needs neither the process's model lock nor a GPU slot.
        with model_step(job.model_slot) if instruction.learned_stage else nullcontext():
            outputs = apply_each(model, instruction, [img for _, img, _ in loaded], job, seeds)
        model_s = (time.monotonic() - started) / len(loaded)
        for (item, source, load_s), output, seed in zip(loaded, outputs, seeds, strict=True):
            if isinstance(output, Exception):
                rows.append(item_error_row(job, item, output))
                continue
            try:
                rows.append(finish_item(job, store, out, model, record, instruction, item, source, output, seed,
                                        {"load_s": load_s, "model_s": model_s}))
            except _NOT_ITEM_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - one item's failure costs its row, not the partition
                rows.append(item_error_row(job, item, exc))
    return rows


def loaded_batches(job: PartitionJob, store: Store, items: list[dict]) -> Iterator[tuple[list, list[dict]]]:
    """(loaded images, error rows) per batch: at most `batch_size` images and, past the first image,
    at most `max_batch_pixels` pixels, since lifting a batch to full resolution costs memory by pixel."""
    loaded: list[tuple[dict, Image.Image, float]] = []
    failed: list[dict] = []
    pixels = 0
    for item in items:
        started = time.monotonic()
        try:
            image = load_image(store, item["key"])
        except _NOT_ITEM_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - one item's failure costs its row, not the partition
            failed.append(item_error_row(job, item, exc))
            continue
        if loaded and pixels + image.width * image.height > job.apply.max_batch_pixels:
            yield loaded, failed
            loaded, failed, pixels = [], [], 0
        loaded.append((item, image, time.monotonic() - started))
        pixels += image.width * image.height
        if len(loaded) == job.apply.batch_size:
            yield loaded, failed
            loaded, failed, pixels = [], [], 0
    if loaded or failed:
        yield loaded, failed


def apply_each(model: LoadedModel | None, instruction: LearnedInstruction, images: list[Image.Image], job: PartitionJob,
               seeds: list[int]) -> list[Image.Image | Exception]:
    """The batch's outputs; if the batch fails, each image alone, so one bad image costs one row."""
    try:
        return apply_instruction(model, instruction, images, job.apply.for_method(), seeds)
    except Exception as exc:  # noqa: BLE001
        if len(images) == 1:
            return [exc]
    outputs: list[Image.Image | Exception] = []
    for image, seed in zip(images, seeds, strict=True):
        outputs += apply_each(model, instruction, [image], job, [seed])
    return outputs


def item_error_row(job: PartitionJob, item: dict, exc: Exception) -> dict:
    """The error row of an item that raised; `error_code` from the image and store vocabulary."""
    if isinstance(exc, ImageError):
        code = exc.code
    elif isinstance(exc, NotFoundError):
        code = "not_found"
    elif isinstance(exc, InvalidKeyError):
        code = "invalid_key"
    elif isinstance(exc, UnsafePathError):
        code = "unsafe_path"
    elif isinstance(exc, MemoryError):
        code = "out_of_memory"
    else:
        code = "item_failed"
    return error_row(job, item, code, str(exc) or type(exc).__name__)


def finish_item(
    job: PartitionJob, store: Store, out: Store, model: LoadedModel | None, record: dict,
    instruction: LearnedInstruction, item: dict, source: Image.Image, output: Image.Image, seed: int, timings: dict,
) -> dict:
    """Write the output, run QC (colour against the category's LUT applied to the source) and build the
    item's manifest row."""
    started = time.monotonic()
    key = output_key(job.run_id, item["category"], job.partition, item["image_id"])
    out.put_bytes(key, encode_png(output), content_type="image/png")
    timings["write_s"] = time.monotonic() - started
    started = time.monotonic()
    qc = assess(source, output, record["reference_shift"], qc_thresholds(instruction, job.qc.thresholds()),
                expected=expected_output(instruction, source, output))
    timings["qc_s"] = time.monotonic() - started
    return manifest_row(
        **_identity(job, item, instruction.route), source_uri=store.uri_for(item["key"]), output_uri=out.uri_for(key),
        model_id=model.model_id if model else None, model_sha256=model.sha256 if model else None,
        instruction_id=record["cache_key"], instruction_sha256=record["sha256"],
        params=_params(job, instruction), seed=seed,
        qc_ssim_structure=_finite(qc.ssim_structure), qc_edit_strength=_finite(qc.edit_strength),
        qc_direction_agreement=_finite(qc.direction_agreement),
        qc_clipped_fraction=_finite(qc.clipped_fraction), qc_figures=_json_safe(qc.figures()),
        qc_status=qc.status, timings={k: round(v, 4) for k, v in timings.items()},
        duration_s=round(sum(timings.values()), 4),
    )


def error_row(job: PartitionJob, item: dict, code: str, message: str) -> dict:
    """The row of an item that could not be edited; the rest of the partition goes on."""
    get_run_logger().warning("%s (%s): %s", item["image_id"], code, message)
    store = open_store(job.store_uri)
    # A path-like key has no URI in the store; record it as given so the row still names it.
    source_uri = item["key"] if item.get("index_error") else store.uri_for(item["key"])
    return manifest_row(**_identity(job, item), source_uri=source_uri, params=_params(job),
                        seed=item_seed(job.run_id, item["image_id"], item["category"]),
                        qc_status="error", error_code=code, error=message)


def cached_instruction(out: Store, record: dict, model: LoadedModel | None) -> LearnedInstruction:
    """The instruction for this model, loaded once per process (partitions share categories)."""
    key = (record["sha256"], model.sha256 if model else "")
    if key not in _INSTRUCTIONS:
        metadata = json.loads(out.get_bytes(record["metadata_key"]))
        _INSTRUCTIONS[key] = load_instruction(out.get_bytes(record["weights_key"]), metadata, model)
    return _INSTRUCTIONS[key]


def _identity(job: PartitionJob, item: dict, route: str | None = None) -> dict:
    """The row's identity; `method` is the instruction's route (an error row: the category's route
    when its instruction is known)."""
    method = route or (job.instructions.get(item["category"]) or {}).get("route") or METHOD
    return {"run_id": job.run_id, "image_id": item["image_id"], "category": item["category"],
            "partition": job.partition, "method": method, "created_at": datetime.now(UTC)}


def _params(job: PartitionJob, instruction: LearnedInstruction | None = None) -> dict:
    params = {"apply": job.apply.model_dump(), "qc": job.qc.model_dump()}
    if instruction is not None and instruction.lut is not None:
        params["lut_size"] = instruction.lut.size
    if instruction is not None and instruction.light_field is not None:
        params["light_field_grid"] = instruction.light_field.grid
    return params


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_safe(figures: dict) -> dict:
    """NaN is not JSON; the manifest records an undefined figure as null."""
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in figures.items()}
