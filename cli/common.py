"""Helpers shared by the batch commands (`apply`, `edit`, `qc`): walk a folder of images in any store,
decode them in batches, report bad inputs and go on, end with one JSON line."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import typer
from PIL import Image
from pydantic import ValidationError

from storage.images import ImageError, decode_image
from storage.store import LocalStore, Store, StoreError, open_store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A failure the user fixes (a path, a flag, a credential): one `error:` line, exit 2, no traceback."""


# Failures whose message already names the cause; anything else is a bug and keeps its traceback.
USER_FACING_ERRORS: tuple[type[BaseException], ...] = (UserError, StoreError, ImageError, ValidationError)


class _Settings:
    debug = False  # set by the app callback (`retouch --debug ...`): tracebacks instead of one line


settings = _Settings()


def user_errors(command: Callable) -> Callable:
    """Wrap a command: a user-facing failure becomes one `error: ...` line on stderr and exit 2
    (`--debug` re-raises it with its traceback). functools.wraps keeps the signature typer reads."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_FACING_ERRORS as exc:
            if settings.debug:
                raise
            message = str(exc).strip() or type(exc).__name__
            if isinstance(exc, ValidationError):
                message = f"invalid {exc.title}: " + "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
                )
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper


@dataclass
class BatchReport:
    """What a batch command did; printed as the last line of its output."""

    command: str
    written: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def fail(self, key: str, reason: str) -> None:
        self.failed.append({"key": key, "reason": reason})
        typer.echo(f"skipped {key}: {reason}", err=True)

    def summary(self) -> dict:
        return {
            "command": self.command,
            "written": len(self.written),
            "failed": len(self.failed),
            "failures": self.failed,
            **self.extra,
        }

    def emit(self) -> None:
        sys.stdout.write(json.dumps(self.summary(), sort_keys=True) + "\n")
        sys.stdout.flush()


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/dir/name.safetensors` -> (`s3://bucket/dir`, `name.safetensors`)."""
    root, _, key = uri.rstrip("/").rpartition("/")
    if not root or root.endswith(":/"):
        raise typer.BadParameter(f"{uri}: give a folder or a path ending in <name>.safetensors")
    return root, key


def sidecar_key(key: str) -> str:
    """The JSON metadata next to an instruction's `<name>.safetensors`."""
    return key.removesuffix(".safetensors") + ".json"


def missing_reason(store: Store, uri: str) -> str:
    """Why nothing was found under `uri`: a local folder that does not exist says so."""
    if isinstance(store, LocalStore) and not store.root.is_dir():
        return f"{uri} does not exist"
    return f"nothing under {uri}"


def resolve_instruction(uri: str, category: str | None = None) -> tuple[Store, str]:
    """(store, key of the .safetensors) for what the user typed: `<name>.safetensors`, its `<name>.json`
    sidecar, or the folder `learn --output DIR` wrote (its one instruction, or `<category>.safetensors`).
    Both files are checked here, so a typo fails before any model loads."""
    if uri.endswith((".safetensors", ".json")):
        root, name = split_uri(uri)
        key = name.removesuffix(".json") + ".safetensors" if name.endswith(".json") else name
        if category is not None and key != f"{category}.safetensors":
            raise UserError(f"--category {category} disagrees with the instruction {uri}")
        store = open_store(root)
        shown = uri
    else:
        store = open_store(uri)
        if category is not None:
            key = f"{category}.safetensors"
        else:
            found = [k for k in store.list() if "/" not in k and k.endswith(".safetensors")]
            if not found:
                raise UserError(f"no instruction (<name>.safetensors) in {uri}: {missing_reason(store, uri)}"
                                if not any(True for _ in store.list()) else
                                f"no instruction (<name>.safetensors) in {uri}")
            if len(found) > 1:
                raise UserError(f"several instructions in {uri} ({', '.join(found)}): choose one with --category")
            key = found[0]
        shown = f"{uri.rstrip('/')}/{key}"
    if not store.exists(key):
        raise UserError(f"instruction {shown} not found")
    if not store.exists(sidecar_key(key)):
        raise UserError(f"instruction {shown} has no {sidecar_key(key)} sidecar next to it (learn writes both)")
    return store, key


WRITE_PROBE_KEY = ".retouch-write-probe"


def check_writable(store: Store, uri: str) -> None:
    """Write and delete a probe object, so a missing permission fails before minutes of work."""
    try:
        store.put_bytes(WRITE_PROBE_KEY, b"")
        store.delete(WRITE_PROBE_KEY)
    except (StoreError, OSError) as exc:
        raise UserError(f"output {uri} is not writable: {exc}") from exc


def check_output_folder(output: str, images_uri: str) -> Store:
    """The output of a batch command: a writable folder, not a file name, not the input itself or a
    folder inside it (a re-run would take the edited PNGs for photos)."""
    if output.endswith((".safetensors", ".json", *IMAGE_SUFFIXES)):
        raise UserError(f"--output {output}: give a folder or s3:// prefix for the edited PNGs, not a file")
    destination, source = open_store(output), open_store(images_uri)
    out_uri, in_uri = destination.uri.rstrip("/") + "/", source.uri.rstrip("/") + "/"
    if out_uri.startswith(in_uri):
        raise UserError(f"--output {output} is inside the input {images_uri}: choose a folder outside it")
    local = destination.root if isinstance(destination, LocalStore) else None
    if local is not None and local.exists() and not local.is_dir():
        raise UserError(f"--output {output} is a file: give a folder")
    check_writable(destination, output)
    return destination


def input_images(uri: str) -> tuple[Store, list[str]]:
    """The photos under `uri` (sorted), refused when there are none: a typo must not pass as 0 written."""
    store = open_store(uri)
    keys = list(image_keys(store))
    if not keys:
        raise UserError(f"no images under {uri}" if any(True for _ in store.list()) else
                        f"no images: {missing_reason(store, uri)}")
    return store, keys


def planned_outputs(keys: list[str]) -> dict[str, str]:
    """input key -> output key. Outputs are flat (`a/b/photo.jpg` -> `photo.png`), so inputs sharing a
    stem would overwrite each other: refused, naming them, before any work."""
    by_output: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_output[output_key_for(key)].append(key)
    clashes = [f"{out} <- {', '.join(ins)}" for out, ins in by_output.items() if len(ins) > 1]
    if clashes:
        raise UserError("photos with the same name would overwrite each other's output (outputs are one "
                        "folder, <stem>.png): " + "; ".join(clashes))
    return {key: output_key_for(key) for key in keys}


def image_keys(store, prefix: str = "") -> Iterator[str]:
    """Keys under `prefix` that look like images, in sorted order (other files are ignored)."""
    for key in store.list(prefix):
        if PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES:
            yield key


def output_key_for(key: str) -> str:
    """`a/b/photo.jpg` -> `photo.png`: one PNG per input with the same stem."""
    return PurePosixPath(key).stem + ".png"


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def decoded_batches(
    source: Store, keys: list[str], batch_size: int, report: BatchReport, label: str
) -> Iterator[list[tuple[str, Image.Image]]]:
    """The one batch loop of the batch commands: decoded photos, `batch_size` keys at a time.

    An unreadable or undecodable photo is reported (`report.fail`) and left out of its batch, so the
    rest goes on; a progress line goes to stderr after each batch, once its consumer is done with it.
    """
    started = time.monotonic()
    done = 0
    for chunk in batched(keys, batch_size):
        photos = []
        for key in chunk:
            try:
                photos.append((key, decode_image(source.get_bytes(key), key)))
            except ImageError as exc:
                report.fail(key, f"{exc.code}: {exc}")
            except StoreError as exc:
                report.fail(key, f"unreadable: {exc}")
        if photos:
            yield photos
        done += len(chunk)
        typer.echo(f"{label}: {done}/{len(keys)} ({time.monotonic() - started:.1f} s)", err=True)
