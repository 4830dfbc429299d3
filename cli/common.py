"""Helpers shared by the batch commands (`apply`, `edit`, `qc`): walk a folder of images in any store,
decode them in batches, report bad inputs and go on, end with one JSON line."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import typer
from PIL import Image
from pydantic import ValidationError

from storage.images import ImageError, decode_image
from storage.store import Store, StoreError

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
