"""Helpers shared by the batch commands (`apply`, `edit`): walk a folder of images in any store,
write one PNG per input with the same stem, report bad inputs and go on, end with one JSON line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import typer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


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

    def emit(self) -> None:
        summary = {
            "command": self.command,
            "written": len(self.written),
            "failed": len(self.failed),
            "failures": self.failed,
            **self.extra,
        }
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
        sys.stdout.flush()


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
