"""`retouch learn` and `retouch apply`: learn one instruction per category (InstructBrush), apply it.

An instruction is stored as `<name>.safetensors` plus a `<name>.json` sidecar with its metadata
(both are needed; the JSON carries the content hash and the model binding). Inputs and outputs are
local folders or s3:// prefixes. Both commands report bad inputs and go on, and end with one JSON
line.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from cli.common import (
    BatchReport,
    UserError,
    check_output_folder,
    check_writable,
    decoded_batches,
    input_images,
    missing_reason,
    planned_outputs,
    resolve_instruction,
    sidecar_key,
    split_uri,
)


class Space(str, Enum):
    attention = "attention"
    text = "text"


class Route(str, Enum):
    auto = "auto"
    lut = "lut"
    lut_instructbrush = "lut+instructbrush"
    instructbrush = "instructbrush"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _artifact_location(output: str, category: str) -> tuple[str, str]:
    """(store root, key of the .safetensors): a `.safetensors` URI as given, else `<category>.safetensors`
    inside the folder `output`."""
    if output.endswith(".safetensors"):
        return split_uri(output)
    return output, f"{category}.safetensors"


def _cube(key: str) -> str:
    return key.removesuffix(".safetensors") + ".cube"


def _load_model(model: str | None, device: str, dtype: str = "float32"):
    from editing.models import load_model
    from storage.model_cache import materialise_model

    return load_model(materialise_model(model) if model else None, kind="ip2p", device=device, dtype=dtype)


def learn_command(
    root_uri: Annotated[str, typer.Argument(help="Folder or s3:// prefix holding exemplars/<category>/...")],
    category: Annotated[str, typer.Option(help="Category (folder under exemplars/) to learn.")],
    output: Annotated[
        str, typer.Option(help="<name>.safetensors URI, or a folder (then <category>.safetensors).")
    ],
    steps: Annotated[int, typer.Option(min=0, help="Optimisation steps (LearnConfig.steps).")] = 400,
    space: Annotated[Space, typer.Option(help="Optimise attention K/V or the text embedding.")] = Space.attention,
    seed: Annotated[int, typer.Option(help="Learning seed.")] = 0,
    init_instruction: Annotated[
        str | None, typer.Option(help="Start from this instruction instead of searching the phrase bank.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="ip2p model folder or s3:// prefix (default: the shipped model).")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    route: Annotated[
        Route,
        typer.Option(help="auto: choose on held-out pairs between the fitted 3D LUT alone, the LUT then a "
                     "learned instruction, and the learned instruction alone; or force one."),
    ] = Route.auto,
    lut_size: Annotated[int, typer.Option(min=2, max=65, help="Lattice points per axis of the 3D LUT.")] = 33,
    light_field: Annotated[
        bool,
        typer.Option(help="Fit a light field under the LUT (a vignette, a dodge or burn in a fixed place of the "
                     "frame) when leaving each pair out shows it helps. The .cube holds the colour only."),
    ] = True,
) -> None:
    """Learn the instruction of one category from its before/after exemplar pairs.

    Writes <name>.safetensors, its <name>.json sidecar and <name>.cube (the fitted LUT, for Photoshop,
    Resolve or ffmpeg's lut3d). The last line is JSON with the route and its held-out figures.

    Example: retouch learn shop/ --category warm --output out/  (writes out/warm.safetensors)"""
    from editing.instruct import (
        InstructionPair,
        LearnConfig,
        RouteConfig,
        learn_routed,
        pair_sha256,
        save_instruction,
    )
    from editing.photometric import cube_bytes
    from storage.images import ImageError
    from storage.layout import list_categories, list_exemplar_pairs, load_pair
    from storage.store import StoreError, open_store

    # 1. check the root, the category and the output before anything slow
    store = open_store(root_uri)
    categories = list_categories(store)
    if category not in categories:
        if not any(True for _ in store.list()):
            raise UserError(f"root {missing_reason(store, root_uri)}")
        raise UserError(f"no category {category!r} under {root_uri} (exemplars/<category>/); categories: "
                        + (", ".join(categories) or "none"))
    root, key = _artifact_location(output, category)
    destination = open_store(root)
    check_writable(destination, output)
    # 2. load the exemplar pairs; a broken pair is reported and the rest goes on
    typer.echo(f"learn {category}: loading exemplar pairs", err=True)
    listed, problems = list_exemplar_pairs(store, category)
    report = BatchReport(command="learn")
    for problem in problems:
        report.fail(problem.key, f"{problem.code}: {problem.reason}")
    pairs: list[InstructionPair] = []
    for pair in listed:
        try:
            before, after = load_pair(store, pair)
        except ImageError as exc:
            report.fail(exc.key, f"{exc.code}: {exc}")
            continue
        except StoreError as exc:
            report.fail(pair.before_key, f"unreadable: {exc}")
            continue
        pairs.append(InstructionPair(pair.pair_id, before, after, pair_sha256(before, after)))
    if not pairs:
        report.extra["error"] = f"no usable exemplar pairs for category {category!r}"
        report.emit()
        raise typer.Exit(code=1)
    typer.echo(f"learn {category}: {len(pairs)} pairs; loading the model", err=True)

    # 3. learn: fit the LUT, learn the instruction, choose the route on held-out pairs
    loaded = _load_model(model, device)
    typer.echo(f"learn {category}: model {loaded.model_id} loaded; learning (route {route.value})", err=True)
    settings = {"space": space.value, "seed": seed, "init_instruction": init_instruction, "steps": steps}
    instruction = learn_routed(loaded, pairs, LearnConfig(**settings),
                               RouteConfig(route=route.value, lut_size=lut_size, seed=seed,
                                           light_field=light_field), category=category)
    # 4. save the instruction, its sidecar and the .cube
    typer.echo(f"learn {category}: route {instruction.route} chosen; saving to {output}", err=True)
    if instruction.light_field is not None:
        typer.echo(f"learn {category}: a light field under the LUT ({instruction.metadata['light_field']['reason']}); the "
                   ".cube holds the colour only, the instruction both", err=True)
    data, metadata = save_instruction(instruction)
    destination.put_bytes(_cube(key), cube_bytes(instruction.lut, title=category), content_type="text/plain")
    destination.put_bytes(key, data, content_type="application/octet-stream")
    destination.put_bytes(sidecar_key(key), json.dumps(metadata, indent=1).encode(), content_type="application/json")
    report.written.extend([destination.uri_for(k) for k in (key, sidecar_key(key), _cube(key))])
    choice = metadata["route_choice"]
    report.extra.update(
        category=category, space=space.value, pairs=len(pairs), instruction=instruction.instruction,
        instruction_sha256=instruction.sha256, model_id=loaded.model_id, model_sha256=loaded.sha256,
        route=instruction.route, route_requested=route.value, route_scores=choice["scores"],
        route_reason=choice["reason"], lut_size=lut_size, lut_fit=metadata["lut_fit"],
        light_field=metadata["light_field"],
        steps=metadata["steps"], best_loss=metadata.get("best_loss"), best_step=metadata.get("best_step"),
        wall_time_s=metadata["route_wall_time_s"],
    )
    report.emit()


def apply_command(
    instruction_uri: Annotated[
        str,
        typer.Argument(help="<name>.safetensors of a learned instruction, its <name>.json, or the folder "
                       "`learn --output` wrote (its one instruction, or --category)."),
    ],
    images_uri: Annotated[str, typer.Argument(help="Folder or s3:// prefix of photos.")],
    output: Annotated[str, typer.Option(help="Folder or s3:// prefix for the edited PNGs.")],
    run_id: Annotated[str, typer.Option(help="Run id; each photo's seed derives from (run, photo, category).")] = "apply",
    category: Annotated[
        str | None, typer.Option(help="Which instruction of an INSTRUCTION_URI folder (<category>.safetensors).")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps (default: the model's).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Text guidance (default: the model's).")] = None,
    image_guidance_scale: Annotated[float | None, typer.Option(help="Image guidance (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per batched UNet call.")] = 16,
    model: Annotated[
        str | None, typer.Option(help="ip2p model folder or s3:// prefix (default: the shipped model).")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    dtype: Annotated[
        DType,
        typer.Option(
            help="Compute dtype; bfloat16 is faster on CPUs with AMX / AVX512-BF16 (measured speed-up: "
            "README, 'Learned instructions')."
        ),
    ] = DType.float32,
) -> None:
    """Apply a learned instruction to every photo under IMAGES_URI; one PNG per input, same size.

    Example: retouch apply out/ shop/catalogue/warm --output edited/ --category warm"""
    from editing.instruct import (
        ApplyConfig,
        InstructionIntegrityError,
        InstructionModelMismatch,
        apply_instruction,
        load_instruction,
    )
    from editing.seeds import item_seed
    from storage.images import encode_png

    # 1. check every input and the output before the model loads (a typo costs seconds, not minutes)
    artifacts, key = resolve_instruction(instruction_uri, category)
    metadata = json.loads(artifacts.get_bytes(sidecar_key(key)))
    source, keys = input_images(images_uri)
    outputs = planned_outputs(keys)
    destination = check_output_folder(output, images_uri)
    # 2. load the model and the instruction
    # The LUT alone never runs the model, so a LUT-route instruction does not wait for it to load.
    loaded = _load_model(model, device, dtype.value) if metadata.get("route") != "lut" else None
    try:
        instruction = load_instruction(artifacts.get_bytes(key), metadata, loaded)
    except (InstructionModelMismatch, InstructionIntegrityError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    config = ApplyConfig(
        num_inference_steps=steps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
        batch_size=batch_size, dtype=dtype.value,
    )
    report = BatchReport(
        command="apply",
        extra={
            "category": instruction.category, "instruction_sha256": instruction.sha256,
            "route": instruction.route, "model_id": loaded.model_id if loaded else None,
            "model_sha256": loaded.sha256 if loaded else None, "dtype": loaded.dtype if loaded else None,
            "run_id": run_id,
        },
    )
    # 3. edit batch by batch; a photo that fails is reported and the rest goes on
    for photos in decoded_batches(source, keys, batch_size, report, f"apply {instruction.category}"):
        seeds = [item_seed(run_id, image_key, instruction.category) for image_key, _ in photos]
        edited = apply_instruction(loaded, instruction, [img for _, img in photos], config, seeds)
        for (image_key, _), result in zip(photos, edited, strict=True):
            out_key = outputs[image_key]
            destination.put_bytes(out_key, encode_png(result), content_type="image/png")
            report.written.append(out_key)
    report.emit()


def register(app: typer.Typer) -> None:
    app.command("learn")(learn_command)
    app.command("apply")(apply_command)
