"""`retouch qc`: the quality checks of the refresh, on a folder of edited photos.

Each edited PNG whose stem matches a source photo is checked against that source and the
instruction's category: structure (SSIM), clipping, the colour shift against the exemplars', and the
colour difference (CIEDE2000) from the instruction's LUT applied to the source. One JSON line per
image, then a summary line with the counts. Statuses are data: the exit code is 0 whatever they are,
and 2 for bad arguments.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import PurePosixPath
from typing import Annotated

import typer

from cli.common import BatchReport, UserError, decoded_batches, image_keys, resolve_instruction, sidecar_key


def qc_command(
    instruction_uri: Annotated[str, typer.Argument(help="<name>.safetensors of the category's instruction.")],
    sources_uri: Annotated[str, typer.Argument(help="Folder or s3:// prefix of the source photos.")],
    edited_uri: Annotated[str, typer.Argument(help="Folder or s3:// prefix of the edited PNGs.")],
    output: Annotated[str | None, typer.Option(help="Also write every line to this JSON-lines file.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos decoded at a time.")] = 16,
) -> None:
    """Check edited photos against their sources and the instruction's category; one JSON line each.

    Example: retouch qc out/warm.safetensors photos/ edited/"""
    from editing.instruct import InstructionIntegrityError, load_instruction
    from editing.instruct.apply import expected_output, qc_thresholds
    from editing.quality import QCThresholds, assess
    from storage.images import ImageError, load_image
    from storage.store import StoreError, open_store

    try:
        artifacts, key = resolve_instruction(instruction_uri)
        metadata = json.loads(artifacts.get_bytes(sidecar_key(key)))
        # QC needs the LUT and the metadata, never the model: the learned tensors are left out.
        instruction = load_instruction(artifacts.get_bytes(key), metadata, photometric_only=True)
        sources, edited = open_store(sources_uri), open_store(edited_uri)
        source_keys = {PurePosixPath(k).stem: k for k in image_keys(sources)}
    except (StoreError, InstructionIntegrityError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if "reference_shift" not in metadata:
        typer.echo(f"error: {instruction_uri} records no reference shift; learn it again with this version",
                   err=True)
        raise typer.Exit(2)
    thresholds = qc_thresholds(instruction, QCThresholds())
    keys = [k for k in image_keys(edited) if PurePosixPath(k).stem in source_keys]
    if not keys:
        raise UserError(f"no edited photo under {edited_uri} has a source under {sources_uri} (matched by stem)")
    report = BatchReport(command="qc", extra={"category": instruction.category, "route": instruction.route})
    counts: dict[str, int] = {}
    sink = open(output, "w") if output else None  # noqa: SIM115 - closed below, after the last line
    try:
        for batch in decoded_batches(edited, keys, batch_size, report, "qc"):
            for edited_key, output_image in batch:
                stem = PurePosixPath(edited_key).stem
                try:
                    source = load_image(sources, source_keys[stem])
                except (ImageError, StoreError) as exc:
                    report.fail(source_keys[stem], f"source unreadable: {exc}")
                    continue
                result = assess(source, output_image, metadata["reference_shift"], thresholds,
                                expected=expected_output(instruction, source))
                counts[result.status] = counts.get(result.status, 0) + 1
                line = {"image": stem, "status": result.status, "figures": _finite(result.figures())}
                _emit(line, sink)
                report.written.append(edited_key)
        report.extra["counts"] = dict(sorted(counts.items()))
        report.extra["unmatched_sources"] = len(source_keys) - len(keys)
        if sink:
            sink.write(json.dumps(report.summary(), sort_keys=True) + "\n")
    finally:
        if sink:
            sink.close()
    report.emit()


def _finite(figures: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}


def _emit(line: dict, sink) -> None:
    text = json.dumps(line, sort_keys=True)
    sys.stdout.write(text + "\n")
    if sink:
        sink.write(text + "\n")


def register(app: typer.Typer) -> None:
    app.command("qc")(qc_command)
