"""edit_partition's bookkeeping, with the model step replaced by a stand-in: one item's failure costs
its row, batches are bounded by pixels, a rewrite keeps recorded verdicts, results persist as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from prefect import flow
from prefect.logging import disable_run_logger

from storage.images import encode_png
from storage.manifest import manifest_row, read_manifest, write_manifest_partition
from storage.run_layout import done_key
from storage.store import LocalStore
from tasks import edit
from tasks.params import ApplyParams, PartitionJob


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def model_step(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int]]]:
    """Replace model, instruction and QC; returns the image sizes of every model call.

    The stand-in edit is the identity, and refuses a batch holding a 13x13 image.
    """
    calls: list[list[tuple[int, int]]] = []

    def apply_instruction(model, instruction, images, config, seeds):
        calls.append([image.size for image in images])
        if (13, 13) in [image.size for image in images]:
            raise ValueError("the model cannot take a 13x13 image")
        return list(images)

    qc = SimpleNamespace(ssim_structure=1.0, edit_strength=1.0, direction_agreement=1.0, clipped_fraction=0.0,
                         status="pass", figures=dict)
    monkeypatch.setattr(edit, "cached_model", lambda *a: SimpleNamespace(model_id="stand-in", sha256="0" * 64))
    instruction = SimpleNamespace(route="instructbrush", learned_stage=True, lut=None, light_field=None, metadata={})
    monkeypatch.setattr(edit, "cached_instruction", lambda *a: instruction)
    monkeypatch.setattr(edit, "apply_instruction", apply_instruction)
    monkeypatch.setattr(edit, "assess", lambda *a, **k: qc)
    return calls


def _job(store: LocalStore, items: list[dict], **apply: object) -> PartitionJob:
    record = {"status": "ok", "cache_key": "k", "sha256": "s", "reference_shift": [0.0]}
    return PartitionJob(store_uri=store.uri, output_uri=store.uri, run_id="r1", partition="p0", items=items,
                        instructions={"c": record}, apply=ApplyParams(**apply))


def _item(store: LocalStore, image_id: str, size: tuple[int, int]) -> dict:
    key = f"catalogue/{image_id}.png"
    store.put_bytes(key, encode_png(Image.new("RGB", size, (90, 60, 30))))
    return {"image_id": image_id, "key": key, "category": "c", "index_error": ""}


def test_any_exception_for_one_item_costs_its_row_not_the_partition(store, model_step, monkeypatch) -> None:
    items = [_item(store, "good-1", (8, 8)), _item(store, "odd", (13, 13)), _item(store, "flaky", (8, 8)),
             _item(store, "good-2", (8, 8))]
    real_load = edit.load_image

    def load_image(where, key):
        if key == "catalogue/flaky.png":
            raise RuntimeError("the decoder crashed")
        return real_load(where, key)

    monkeypatch.setattr(edit, "load_image", load_image)
    with disable_run_logger():
        summary = edit.edit_partition.fn(_job(store, items))

    rows = read_manifest(store, "r1").set_index("image_id")
    assert summary["items"] == 4 and summary["qc_status"] == {"error": 2, "pass": 2}
    assert rows.loc["flaky", ["qc_status", "error_code", "error"]].tolist() == ["error", "item_failed",
                                                                                 "the decoder crashed"]
    assert rows.loc["odd", ["qc_status", "error_code"]].tolist() == ["error", "item_failed"]
    assert "13x13" in rows.loc["odd", "error"]
    assert rows.loc[["good-1", "good-2"], "output_uri"].notna().all()
    # The batch that failed was retried image by image: only the odd one was lost.
    assert model_step == [[(8, 8), (13, 13), (8, 8)], [(8, 8)], [(13, 13)], [(8, 8)]]
    assert store.exists(done_key("r1", "p0"))


def test_batches_are_cut_by_pixels_so_a_partition_of_large_photos_stays_bounded(store, model_step) -> None:
    items = [_item(store, f"big-{i}", (1000, 1000)) for i in range(5)]
    with disable_run_logger():
        edit.edit_partition.fn(_job(store, items, batch_size=16, max_batch_pixels=2_000_000))
    assert [len(call) for call in model_step] == [2, 2, 1]
    assert all(sum(w * h for w, h in call) <= 2_000_000 for call in model_step)


def test_a_rewritten_partition_keeps_every_recorded_verdict(store) -> None:
    """A lost completion marker (or a reused run id) edits the partition again: reviewed rows stay."""
    reviewed = manifest_row(run_id="r1", image_id="a", category="c", partition="p0", method="instructbrush",
                            output_uri=store.uri_for("edited/a.png"), qc_status="pass", review_status="approved",
                            reviewer="alice", published_uri=store.uri_for("published/c/a.png"))
    gone = {**reviewed, "image_id": "gone", "review_status": "rejected", "published_uri": None}
    write_manifest_partition(store, "r1", "p0", [reviewed, gone])
    items = [{"image_id": i, "key": f"../{i}.png", "category": "c", "index_error": "bad key"} for i in ("a", "b")]
    with disable_run_logger():
        edit.edit_partition.fn(_job(store, items))
    rows = read_manifest(store, "r1").set_index("image_id")
    assert sorted(rows.index) == ["a", "b", "gone"]
    assert rows.loc["a", ["review_status", "reviewer", "qc_status"]].tolist() == ["approved", "alice", "pass"]
    assert rows.loc["gone", "review_status"] == "rejected"
    assert rows.loc["b", ["review_status", "error_code"]].tolist() == ["pending", "invalid_key"]


def test_resumable_results_are_json_and_a_resumed_flow_run_takes_them_back(prefect_harness, store) -> None:
    """A retried flow run re-executes from the top, like a resume after suspend; the partition comes
    back Cached from a JSON result (a pickle there would run code when it is loaded)."""
    marker = {"partition": "p0", "items": 0, "qc_status": {}, "by_category": {}, "duration_s": 0.5}
    store.put_bytes(done_key("r1", "p0"), json.dumps(marker).encode())
    job = _job(store, [])
    states = []

    @flow(retries=1, retry_delay_seconds=0)
    def resumed() -> dict:
        states.append(edit.edit_partition(job, return_state=True))
        if len(states) == 1:
            raise RuntimeError("the process stops at the gate")
        return states[-1].result()

    assert resumed() == {**marker, "skipped": True}
    assert [s.name for s in states] == ["Completed", "Cached"]
    record = states[0].data
    assert record.metadata.serializer.type == "json"
    stored = json.loads(Path(record.metadata.storage_key).read_bytes())
    assert stored["metadata"]["serializer"]["type"] == "json"
    assert json.loads(stored["result"]) == {**marker, "skipped": True}
    for options in (edit.edit_partition, edit.edit_partition.with_options(**edit.RESUMABLE)):
        assert options.result_serializer == "json" and options.persist_result


def test_finished_pieces_lists_the_run_once_and_reads_only_what_it_found(tmp_path, monkeypatch) -> None:
    """A dispatch's check of its pack: markers and shard files come from one listing; a shard file
    whose items differ from the piece (shard_size changed) is not finished; nothing else is asked."""
    from storage.run_layout import shard_key
    from tasks.params import PartitionPiece

    out = LocalStore(tmp_path / "out")

    def piece(partition: str, ids: list[str], shard: int | None = None) -> PartitionPiece:
        items = [{"image_id": i, "category": "warm"} for i in ids]
        job = PartitionJob(store_uri="-", output_uri=str(tmp_path / "out"), run_id="night", partition=partition,
                           items=items, instructions={})
        return PartitionPiece(job=job, shard=shard)

    pieces = [piece("p1", ["a"]), piece("p2", ["b", "c"], shard=0), piece("p2", ["d"], shard=1),
              piece("p3", ["e"]), piece("p4", ["f"], shard=0)]
    out.put_bytes(done_key("night", "p1"), json.dumps({"partition": "p1", "items": 1}).encode())
    record = {"summary": {"partition": "p2", "items": 2}, "rows": [{"image_id": "b"}, {"image_id": "c"}]}
    out.put_bytes(shard_key("night", "p2", 0), json.dumps(record).encode())
    stale = {"summary": {"partition": "p4", "items": 1}, "rows": [{"image_id": "other"}]}
    out.put_bytes(shard_key("night", "p4", 0), json.dumps(stale).encode())
    out.put_bytes(done_key("other-night", "p3"), b"{}")  # another run's marker counts for nothing

    listings, asked = [], []
    real_list, real_exists = LocalStore.list, LocalStore.exists
    monkeypatch.setattr(LocalStore, "list", lambda self, prefix="": listings.append(prefix) or real_list(self, prefix))
    monkeypatch.setattr(LocalStore, "exists", lambda self, key: asked.append(key) or real_exists(self, key))

    done = edit.finished_pieces(pieces)

    assert sorted(done) == [0, 1]
    assert done[0] == {"partition": "p1", "items": 1, "skipped": True}
    assert done[1] == {"partition": "p2", "items": 2, "shard": 0, "skipped": True}
    assert len(listings) == 1
    # Only the three pieces with something listed were looked at again (p2/1 and p3 were not).
    assert not any("p3" in key or "00001" in key for key in asked)


LUT_PARTITION_DRIVER = """
import json, sys
from prefect.logging import disable_run_logger
from tasks import edit
from tasks.params import PartitionJob

job = PartitionJob.model_validate_json(sys.argv[1])
with disable_run_logger():
    summary = edit.edit_partition.fn(job)
print(json.dumps({"summary": summary, "loaded": sorted(m for m in ("torch", "diffusers", "transformers")
                                                       if m in sys.modules)}))
"""


def test_a_lut_partition_runs_in_a_process_that_never_imports_torch(store, tmp_path) -> None:
    """A partition run on the LUT route is a fresh process on a pool worker; its instruction, its
    photometric stage (a LUT and a light field), QC and manifest run on numpy and Pillow, so the
    process starts without torch (~2 s and ~300 MB per run). Its outputs are the torch path's."""
    import os
    import subprocess
    import sys

    import numpy as np
    import torch

    from editing.instruct import LearnedInstruction, save_instruction
    from editing.light_field import LightField, apply_light_field
    from editing.photometric import Lut, apply_lut, identity_lut
    from editing.quality import reference_shift
    from storage.run_layout import instruction_keys, output_key

    warm = identity_lut(9).table * np.array([1.0, 0.9, 0.75], dtype=np.float32)
    vignette = LightField(torch.linspace(0.7, 1.0, 9)[:, None].expand(9, 9), torch.zeros(9, 9))
    lut = Lut(warm, identity_lut(9).domain)
    instruction = LearnedInstruction(
        category="c", space="attention", instruction="", num_tokens=1, num_groups=1, context=None, tensors={},
        model_id="none", model_sha256="0" * 64, route="lut", lut=lut, light_field=vignette,
    )
    data, metadata = save_instruction(instruction)
    weights_key, metadata_key = instruction_keys("c", "k")
    store.put_bytes(weights_key, data)
    store.put_bytes(metadata_key, json.dumps(metadata).encode())
    colours = [(200, 150, 120), (90, 60, 30), (30, 120, 200)]
    items, images = [], []
    for i, colour in enumerate(colours):
        image = Image.fromarray(np.random.default_rng(i).integers(0, 40, (24, 32, 3), dtype=np.uint8) + np.uint8(colour))
        store.put_bytes(f"catalogue/p{i}.png", encode_png(image))
        items.append({"image_id": f"p{i}", "key": f"catalogue/p{i}.png", "category": "c", "index_error": ""})
        images.append(image)
    shift = reference_shift([(image, apply_lut(lut, image)) for image in images])
    record = {"status": "ok", "route": "lut", "cache_key": "k", "sha256": metadata["content_sha256"],
              "weights_key": weights_key, "metadata_key": metadata_key, "reference_shift": shift}
    job = PartitionJob(store_uri=store.uri, output_uri=store.uri, run_id="r1", partition="p0", items=items,
                       instructions={"c": record}, apply=ApplyParams())

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = subprocess.run([sys.executable, "-c", LUT_PARTITION_DRIVER, job.model_dump_json()], env=env, check=False,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["loaded"] == []
    rows = read_manifest(store, "r1").set_index("image_id")
    assert report["summary"]["items"] == 3 and "error" not in report["summary"]["qc_status"], rows["error"].tolist()
    rows = read_manifest(store, "r1").set_index("image_id")
    for i in range(len(colours)):
        source = edit.load_image(store, f"catalogue/p{i}.png")
        assert rows.loc[f"p{i}", "output_uri"] == store.uri_for(output_key("r1", "c", "p0", f"p{i}"))
        output = np.asarray(edit.load_image(store, output_key("r1", "c", "p0", f"p{i}")))
        pixels = torch.from_numpy(np.array(apply_lut(lut, source))).permute(2, 0, 1) / 255
        through_torch = apply_light_field(vignette, pixels).permute(1, 2, 0).numpy() * 255
        assert np.abs(output.astype(np.float64) - through_torch).max() <= 1.0
        assert rows.loc[f"p{i}", "method"] == "lut"
