"""`retouch edit`: tuning-free text edits (FPE, SimInversion, DDIM+P2P) over a folder of photos.

Photos are edited in batches at the t2i model's native size and the edit is carried back to each
photo's own resolution by `editing.carry.carry_edit`, so the outputs keep the photo's detail:
`--carry colour` as a LUT fitted on the native pair (what a global style caption means), or
`--carry lift` as a local colour affine (keeps local changes such as a vignette). Without the
option the model folder's edits.json decides per caption (`editing.carry.resolve_carry`); the
summary records the mode, where it came from, and per output how much of the model's edit the
colour carry kept. Every output also gets QC's skin check (`editing.quality.skin_figure`): an
output that pushes the photo's skin tones out of range is reported on stderr and counted in the
summary's `skin_flagged` (the file is still written). One PNG per input with the same stem;
unreadable inputs are reported and skipped; the last line is a JSON summary.
Steps and guidance scales not given on the command line come from the model folder's edits.json
(`defaults.text_edit`), else the papers' values (`editing.text_edit.resolve_text_edit`); the
summary's `params` records the values used and where each came from.
"""

from __future__ import annotations

import inspect
import math
from enum import Enum
from typing import Annotated

import torch
import typer

from cli.common import BatchReport, check_output_folder, decoded_batches, input_images, planned_outputs


class Carry(str, Enum):
    lift = "lift"
    colour = "colour"


class Method(str, Enum):
    fpe = "fpe"
    siminversion = "siminversion"
    ddim_p2p = "ddim-p2p"


def _method_kwargs(
    method: Method, w_inv: float | None, w_src: float | None, w_tgt: float | None
) -> dict[str, float]:
    """Only the scales the user set, so each method keeps its own defaults for the rest."""
    if method is Method.fpe and w_inv is not None:
        raise typer.BadParameter(
            "FPE inverts with the empty prompt, so --w-inv has no effect", param_hint="--w-inv"
        )
    given = {"w_inv": w_inv, "w_src": w_src, "w_tgt": w_tgt}
    return {name: value for name, value in given.items() if value is not None}


def _edit_function(method: Method):
    from editing.fpe import fpe_edit
    from editing.p2p import ddim_p2p_edit
    from editing.siminversion import siminversion_edit

    return {Method.fpe: fpe_edit, Method.siminversion: siminversion_edit, Method.ddim_p2p: ddim_p2p_edit}[
        method
    ]


def edit_command(
    images_uri: Annotated[str, typer.Argument(help="Folder or s3://bucket/prefix of photos to edit.")],
    target_prompt: Annotated[str, typer.Option(help='What the photo should become, e.g. "a sepia photo".')],
    output: Annotated[str, typer.Option(help="Folder or s3:// prefix for the edited PNGs.")],
    source_prompt: Annotated[
        str, typer.Option(help='What the photo shows now, e.g. "a photo" (FPE does not need it).')
    ] = "",
    method: Annotated[Method, typer.Option(help="Editing method.")] = Method.fpe,
    w_inv: Annotated[
        float | None,
        typer.Option(
            help="Guidance of the inversion pass (default: the model's, else SimInversion 0.5, DDIM+P2P 1)."
        ),
    ] = None,
    w_src: Annotated[
        float | None,
        typer.Option(help="Guidance of the source branch (default: the model's, else the paper's)."),
    ] = None,
    w_tgt: Annotated[
        float | None, typer.Option(help="Guidance of the target branch (default: the model's, else 7.5).")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="DDIM steps, inversion and sampling each (default: the model's, else 50)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed; each photo's VAE posterior draw derives from it.")] = 0,
    model: Annotated[
        str | None, typer.Option(help="t2i model folder or s3:// prefix (default: the shipped model).")
    ] = None,
    carry: Annotated[
        Carry | None,
        typer.Option(
            help="How the native-size edit reaches the photo's resolution: colour (a LUT fitted on the "
            "native pair; keeps every pixel, carries only colour) or lift (local colour affine; also "
            "carries vignettes, blur and the model's drift). Default: the model's choice for the "
            "caption, else lift."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per batched UNet call.")] = 4,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    inversion_iterations: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Fixed-point iterations per DDIM inversion step (0 = plain inversion, as in the papers; "
            "default: 1 for SimInversion, 2 for the others).",
        ),
    ] = None,
) -> None:
    """Edit every photo under IMAGES_URI from --source-prompt to --target-prompt.

    Example: retouch edit photos/ --source-prompt "a photo" --target-prompt "a sepia photo" --output edited/"""
    from editing.carry import carry_edit, resolve_carry
    from editing.instruct.ops import pil_to_tensor, tensor_to_pil, to_native
    from editing.models import load_model, native_resolution
    from editing.quality import FLAG_SKIN_OUTLIERS, skin_figure
    from editing.seeds import item_seed
    from editing.text_edit import resolve_text_edit
    from storage.images import encode_png
    from storage.model_cache import materialise_model

    if method is not Method.fpe and not source_prompt:
        raise typer.BadParameter(f"{method.value} inverts with the source prompt; give --source-prompt")
    edit = _edit_function(method)
    if inversion_iterations is None:  # the method's own default, recorded in the summary
        inversion_iterations = inspect.signature(edit).parameters["inversion_iterations"].default
    overrides = _method_kwargs(method, w_inv, w_src, w_tgt)
    source, keys = input_images(images_uri)  # checked before the model loads
    outputs = planned_outputs(keys)
    destination = check_output_folder(output, images_uri)
    loaded = load_model(materialise_model(model) if model else None, kind="t2i", device=device)
    resolution = native_resolution(loaded.pipe, loaded.spec)
    try:
        settings = resolve_text_edit(
            method.value.replace("-", "_"), loaded.spec, num_inference_steps=steps, **overrides
        )
        carry_mode, carry_origin = resolve_carry(loaded.spec, target_prompt, carry.value if carry else None)
    except (TypeError, ValueError) as exc:  # a negative scale, or a malformed edits.json block
        raise typer.BadParameter(str(exc)) from exc
    report = BatchReport(
        command="edit",
        extra={
            "method": method.value,
            "model_id": loaded.model_id,
            "model_sha256": loaded.sha256,
            "params": {
                "source_prompt": source_prompt,
                "target_prompt": target_prompt,
                "seed": seed,
                "inversion_iterations": inversion_iterations,
                "carry": carry_mode,
                "carry_origin": carry_origin,
                **settings.record(),
            },
            "carried": {},
            "skin_flagged": [],
        },
    )
    for decoded in decoded_batches(source, keys, batch_size, report, f"edit {method.value}"):
        photos = [(key, pil_to_tensor(image)) for key, image in decoded]
        small = torch.cat([to_native(full[None], resolution) for _, full in photos])
        generators = [
            torch.Generator(device=device).manual_seed(item_seed(str(seed), key, method.value))
            for key, _ in photos
        ]
        result = edit(
            loaded.pipe,
            image=small,
            source_prompt=source_prompt,
            target_prompt=target_prompt,
            generator=generators,
            device=device,
            inversion_iterations=inversion_iterations,
            **settings.values,
        )
        for (key, full), source_small, edited_small in zip(photos, small, result.images, strict=True):
            carried = carry_edit(full, source_small, edited_small, carry_mode)
            out_key = outputs[key]
            destination.put_bytes(out_key, encode_png(tensor_to_pil(carried.image)), content_type="image/png")
            report.written.append(out_key)
            skin = skin_figure(full.permute(1, 2, 0).numpy(), carried.image.permute(1, 2, 0).numpy())
            report.extra["carried"][out_key] = {**carried.record(), "skin_outliers": None if math.isnan(skin) else skin}
            if skin > FLAG_SKIN_OUTLIERS:
                report.extra["skin_flagged"].append(out_key)
                typer.echo(f"flagged {out_key}: skin tones out of range ({skin:.0%} of them)", err=True)
    report.emit()


def register(app: typer.Typer) -> None:
    app.command("edit")(edit_command)
