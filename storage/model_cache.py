"""Make a model folder available on local disk, downloading an S3 prefix once per content version.

diffusers loads from a local folder, while production keeps weights on S3. Workers come and go, so
the download is keyed by a hash of the object listing (keys, sizes, ETags): unchanged weights are
reused across runs, and a re-uploaded model gets a fresh folder instead of a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from storage.store import StoreError, open_store

__all__ = ["COMPLETE_MARKER", "default_cache_dir", "materialise_model"]

# Written last, inside the download folder: a folder without it is an interrupted download.
COMPLETE_MARKER = ".retouch-complete.json"


def default_cache_dir() -> Path:
    """`$RETOUCH_MODEL_CACHE`, else `$XDG_CACHE_HOME/catalogue-retouch/models` (~/.cache by default)."""
    if os.environ.get("RETOUCH_MODEL_CACHE"):
        return Path(os.environ["RETOUCH_MODEL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "catalogue-retouch" / "models"


def materialise_model(uri: str, cache_dir: Path | None = None) -> Path:
    """A local folder holding the model at `uri`.

    A local path (or file:// URI) is returned as is. An `s3://` prefix is downloaded into a temporary
    sibling folder, marked complete, and renamed into place, so readers never see a partial model
    and a crash mid-download simply leaves a temp folder and the next call downloads again.
    """
    if not uri.startswith("s3://"):
        path = Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)
        path = path.expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")
        return path

    store = open_store(uri)
    listing = [(o.key, o.size, o.etag) for o in store.list_objects()]
    if not listing:
        raise StoreError(f"{uri}: no objects under this prefix; is it the model folder?")
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / digest[:32]
    if (target / COMPLETE_MARKER).is_file():
        return target

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".partial-{digest[:32]}-{uuid.uuid4().hex[:8]}"
    try:
        for key, size, _etag in listing:
            dest = tmp / key
            store.download_file(key, dest)
            if dest.stat().st_size != size:
                raise StoreError(
                    f"{store.uri_for(key)}: downloaded {dest.stat().st_size} bytes, listed {size}"
                )
        marker = {"uri": uri, "sha256_of_listing": digest, "objects": listing}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
        if target.exists():
            if (target / COMPLETE_MARKER).is_file():
                return target  # another worker finished first
            shutil.rmtree(target)  # unmarked, so incomplete (e.g. copied in by hand and interrupted)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
