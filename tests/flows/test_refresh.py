"""catalogue_refresh end to end on a real S3 server (SeaweedFS) with the tiny random model.

One refresh runs per module and the tests read what it left; a second and a third run check the
instruction cache and the resume-by-marker behaviour. The tiny model produces noise, so QC statuses
are not asserted here (tests/editing/test_quality.py does that on real edits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from editing.photos import load_photo
from storage.images import encode_png
from storage.layout import write_catalogue_index
from storage.manifest import read_manifest
from storage.store import Store, open_store
from tests.tiny_models import build_tiny_ip2p

pytestmark = pytest.mark.usefixtures("prefect_harness")

PHOTOS = ("astronaut", "rocket", "coffee", "chelsea")
# category -> number of good exemplar pairs ("solo" has too few to learn)
EXEMPLARS = {"warm": 3, "cool": 3, "solo": 1}
CATALOGUE = {  # partition -> [(image_id, category)]
    "p0": [("a1", "warm"), ("a2", "cool"), ("a3", "warm"), ("bad", "warm")],
    "p1": [("b1", "cool"), ("b2", "warm"), ("b3", "solo")],
}


def _photo(i: int, side: int = 48) -> Image.Image:
    return Image.fromarray(load_photo(PHOTOS[i % len(PHOTOS)])).resize((side, side))


def build_shop(store: Store) -> None:
    """Exemplars (one broken pair in 'warm'), a catalogue with a truncated JPEG, and its index."""
    for category, count in EXEMPLARS.items():
        for p in range(count):
            before = _photo(p)
            after = before.point(lambda v: min(255, v + 30)) if category == "warm" else before.point(lambda v: v // 2)
            store.put_bytes(f"exemplars/{category}/pair{p}/before.png", encode_png(before))
            store.put_bytes(f"exemplars/{category}/pair{p}/after.png", encode_png(after))
    store.put_bytes("exemplars/warm/broken/before.png", encode_png(_photo(0)))
    rows = []
    for partition, items in CATALOGUE.items():
        for n, (image_id, category) in enumerate(items):
            key = f"catalogue/{image_id}.png"
            data = encode_png(_photo(n, side=40 + 8 * n))
            store.put_bytes(key, data[: len(data) // 2] if image_id == "bad" else data)
            rows.append({"image_id": image_id, "key": key, "category": category, "partition": partition})
    write_catalogue_index(store, pd.DataFrame(rows))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p")


@pytest.fixture(scope="module")
def shop_uri(seaweed_s3) -> str:
    uri = f"s3://{seaweed_s3.bucket}/refresh-shop"
    build_shop(open_store(uri))
    return uri


def refresh_config(shop_uri: str, model: Path, run_id: str):
    from tasks.params import ApplyParams, LearnParams, RefreshConfig, ReviewConfig

    return RefreshConfig(
        store_uri=shop_uri, run_id=run_id, model_uri=str(model),
        learn=LearnParams(steps=2, batch_size=2, init_instruction="make it warmer"),
        apply=ApplyParams(num_inference_steps=2, batch_size=2),
        review=ReviewConfig(policy="auto_approve_passing"),
    )


@pytest.fixture(scope="module")
def first_run(shop_uri: str, tiny_model: Path) -> dict:
    from flows.refresh import catalogue_refresh

    return catalogue_refresh(refresh_config(shop_uri, tiny_model, "night-1"))


def test_every_catalogue_item_has_one_manifest_row(first_run, shop_uri):
    manifest = read_manifest(open_store(shop_uri), "night-1")
    expected = sorted(image_id for items in CATALOGUE.values() for image_id, _ in items)
    assert sorted(manifest["image_id"]) == expected
    assert set(manifest["review_status"]) <= {"approved", "rejected"}


def test_edited_outputs_exist_at_deterministic_keys_with_input_size(first_run, shop_uri):
    store = open_store(shop_uri)
    edited = read_manifest(store, "night-1").dropna(subset=["output_uri"])
    assert sorted(edited["image_id"]) == ["a1", "a2", "a3", "b1", "b2"]
    for row in edited.itertuples():
        key = f"edited/run=night-1/{row.category}/{row.partition}/{row.image_id}.png"
        assert row.output_uri == store.uri_for(key)
        source = Image.open(store.local_path(key) if store.local_path(key) else _open(store, key))
        assert source.size == Image.open(_open(store, f"catalogue/{row.image_id}.png")).size
        assert row.qc_status in {"pass", "flag", "fail"}
        assert json.loads(row.qc_figures)["ssim_structure"] is not None


def _open(store: Store, key: str):
    import io

    return io.BytesIO(store.get_bytes(key))


def test_corrupt_image_gets_an_error_row_and_the_rest_completes(first_run, shop_uri):
    manifest = read_manifest(open_store(shop_uri), "night-1").set_index("image_id")
    assert manifest.loc["bad", "qc_status"] == "error"
    assert manifest.loc["bad", "error_code"] == "truncated"
    assert manifest.loc["a3", "qc_status"] != "error"


def test_category_with_too_few_pairs_is_not_learned_and_its_items_get_error_rows(first_run, shop_uri):
    manifest = read_manifest(open_store(shop_uri), "night-1").set_index("image_id")
    assert manifest.loc["b3", "error_code"] == "no_instruction"
    assert "1 usable exemplar pairs" in manifest.loc["b3", "error"]
    assert first_run["instructions"] == {"learned": 2, "reused": 0, "not_learned": 1}


def test_run_leaves_markers_summary_and_contact_sheets(first_run, shop_uri):
    store = open_store(shop_uri)
    assert store.exists("edited/run=night-1/_done/p0.json") and store.exists("edited/run=night-1/_done/p1.json")
    saved = json.loads(store.get_bytes("runs/night-1/summary.json"))
    assert saved["partitions"] == {"total": 2, "done": 2, "skipped": 0}
    assert saved["categories"]["warm"]["qc_status"]["error"] == 1
    assert store.exists("edited/run=night-1/contact-sheets/warm.png")
    assert store.exists("edited/run=night-1/contact-sheets/cool.png")


def test_unchanged_inputs_learn_nothing_on_the_next_night(first_run, shop_uri, tiny_model):
    from flows.refresh import catalogue_refresh

    store = open_store(shop_uri)
    instructions_before = sorted(store.list("instructions/"))
    second = catalogue_refresh(refresh_config(shop_uri, tiny_model, "night-2"))
    assert second["instructions"] == {"learned": 0, "reused": 2, "not_learned": 1}
    assert sorted(store.list("instructions/")) == instructions_before
    assert len(read_manifest(store, "night-2")) == 7


def test_bfloat16_application_is_a_config_field_and_the_manifest_records_it(first_run, shop_uri, tiny_model):
    """apply.dtype reaches the model step (learning stays float32 and is reused) and every row's params."""
    from flows.refresh import catalogue_refresh

    config = refresh_config(shop_uri, tiny_model, "night-bf16")
    config.apply.dtype = "bfloat16"
    summary = catalogue_refresh(config)
    assert summary["instructions"] == {"learned": 0, "reused": 2, "not_learned": 1}
    store = open_store(shop_uri)
    manifest = read_manifest(store, "night-bf16")
    assert len(manifest) == 7
    assert {json.loads(p)["apply"]["dtype"] for p in manifest["params"]} == {"bfloat16"}
    edited = manifest.dropna(subset=["output_uri"])
    assert sorted(edited["image_id"]) == ["a1", "a2", "a3", "b1", "b2"]
    first = read_manifest(store, "night-1")
    assert {json.loads(p)["apply"]["dtype"] for p in first["params"]} == {"float32"}


def test_rerun_of_a_finished_run_skips_every_partition_and_duplicates_nothing(first_run, shop_uri, tiny_model):
    from flows.refresh import catalogue_refresh

    store = open_store(shop_uri)
    again = catalogue_refresh(refresh_config(shop_uri, tiny_model, "night-1"))
    assert again["partitions"] == {"total": 2, "done": 0, "skipped": 2}
    manifest = read_manifest(store, "night-1")
    assert len(manifest) == 7 and manifest["image_id"].is_unique
