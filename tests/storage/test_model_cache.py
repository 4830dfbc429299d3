"""Model folders from S3 are downloaded once per content version; interrupted downloads are redone."""

from __future__ import annotations

import json

import pytest

from storage.model_cache import COMPLETE_MARKER, materialise_model
from storage.store import S3Store, StoreError, StoreUnavailableError

FILES = {
    "model_index.json": json.dumps({"_class_name": "StableDiffusionInstructPix2PixPipeline"}).encode(),
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": b"\x00" * 4096,
}


@pytest.fixture
def s3_model(s3_uri) -> str:
    store = S3Store(s3_uri)
    for key, data in FILES.items():
        store.put_bytes(key, data)
    return s3_uri


def _tree(path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in path.rglob("*")
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def test_local_folder_is_returned_as_is(tmp_path):
    assert materialise_model(str(tmp_path)) == tmp_path
    assert materialise_model(tmp_path.as_uri()) == tmp_path
    with pytest.raises(FileNotFoundError):
        materialise_model(str(tmp_path / "missing"))


def test_s3_prefix_is_downloaded_once_and_reused(s3_model, tmp_path):
    path = materialise_model(s3_model, cache_dir=tmp_path)
    assert _tree(path) == FILES
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["uri"] == s3_model and len(marker["objects"]) == 3
    # Served from the cache: a local edit survives, so nothing was fetched again.
    (path / "unet" / "config.json").write_bytes(b'{"touched": true}')
    assert materialise_model(s3_model, cache_dir=tmp_path) == path
    assert (path / "unet" / "config.json").read_bytes() == b'{"touched": true}'
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_changed_weights_get_a_fresh_folder(s3_model, tmp_path):
    first = materialise_model(s3_model, cache_dir=tmp_path)
    S3Store(s3_model).put_bytes("unet/config.json", b'{"sample_size": 16}')
    second = materialise_model(s3_model, cache_dir=tmp_path)
    assert second != first and (second / "unet" / "config.json").read_bytes() == b'{"sample_size": 16}'


def test_interrupted_download_is_redone(s3_model, tmp_path, monkeypatch):
    calls = []
    real = S3Store.download_file

    def flaky(self, key, dest):
        calls.append(key)
        if len(calls) == 2:
            raise StoreUnavailableError("connection dropped mid-download")
        real(self, key, dest)

    monkeypatch.setattr(S3Store, "download_file", flaky)
    with pytest.raises(StoreUnavailableError):
        materialise_model(s3_model, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [], "no partial folder may look like a cached model"
    path = materialise_model(s3_model, cache_dir=tmp_path)
    assert _tree(path) == FILES


def test_unmarked_folder_is_not_trusted(s3_model, tmp_path):
    path = materialise_model(s3_model, cache_dir=tmp_path)
    (path / COMPLETE_MARKER).unlink()
    (path / "unet" / "config.json").write_bytes(b"half-written")
    assert materialise_model(s3_model, cache_dir=tmp_path) == path
    assert _tree(path) == FILES


def test_empty_prefix_is_a_clear_error(s3_uri, tmp_path):
    with pytest.raises(StoreError, match="no objects under this prefix"):
        materialise_model(s3_uri, cache_dir=tmp_path)
