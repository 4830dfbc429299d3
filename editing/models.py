"""Load a diffusion model folder (the shipped tiny default, or real InstructPix2Pix / SD 1.5) offline.

The same call serves the laptop demo and a GPU worker: `load_model()` gives the embedded
`retouch-tiny-ip2p`; `load_model("/models/instruct-pix2pix", device="cuda", dtype=torch.float16)`
gives a real `timbrooks/instruct-pix2pix` folder (a diffusers `save_pretrained` layout, such as a
hub snapshot directory), and `kind="t2i"` a Stable Diffusion 1.5 folder. Real folders carry no
`edits.json`, so `spec` is None and callers use the pipeline's own defaults (text edits: the
papers' guidance, `editing.text_edit.PAPER_DEFAULTS`). An `s3://` prefix is
first turned into a local folder by `storage.model_cache.materialise_model(uri)`; editing/ never
talks to S3 itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED = {"ip2p": "retouch-tiny-ip2p", "t2i": "retouch-tiny-t2i"}
# The diffusers pipeline class per kind, by name: diffusers is imported when a model is loaded, so a
# process that only applies LUTs (a partition run on the LUT route) starts without it (~5 s less).
PIPELINES: dict[str, str] = {
    "ip2p": "StableDiffusionInstructPix2PixPipeline",
    "t2i": "StableDiffusionPipeline",
}
UNET_IN_CHANNELS = {"ip2p": 8, "t2i": 4}
# Compute dtypes by the names configs and the CLI use.
# torch is imported where a dtype is parsed, not here: a process that only applies LUTs (a partition
# run on the LUT route) imports this module for its types and starts without torch.
DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DTypeName)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its config name ("float32", "bfloat16", "float16"); dtypes pass through."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (inverse of `parse_dtype`)."""
    import torch

    for name in DTYPES:
        if getattr(torch, name) == dtype:
            return name
    raise ValueError(f"unsupported model dtype {dtype}; use one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded pipeline plus what the manifest records about it (model_id, sha256)."""

    pipe: DiffusionPipeline
    kind: str
    model_id: str
    sha256: str
    path: Path
    spec: dict[str, Any] | None

    @property
    def dtype(self) -> str:
        """The compute dtype of the UNet, by name ("float32", "bfloat16", "float16")."""
        return dtype_name(next(self.pipe.unet.parameters()).dtype)


def native_resolution(pipe: DiffusionPipeline, spec: dict[str, Any] | None = None) -> int:
    """The square image size the model was trained at: edits.json's `resolution`, else the UNet's
    sample size times the VAE's downsampling factor (how stock pipelines size their default output)."""
    if spec and spec.get("resolution"):
        return int(spec["resolution"])
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def shipped_model_dir(kind: str) -> Path:
    """The folder of the embedded default model of a kind ("ip2p" or "t2i")."""
    if kind not in SHIPPED:
        raise ValueError(f"kind must be one of {sorted(SHIPPED)}, got {kind!r}")
    return WEIGHTS_DIR / SHIPPED[kind]


def _hashed_files(folder: Path) -> list[Path]:
    """Files that determine behaviour: everything except dot-files and Markdown (the model card).

    Excluding the card lets its text be corrected without orphaning instructions learned against
    the model (they are bound to this hash).
    """
    return sorted(
        (
            p
            for p in folder.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and p.suffix.lower() != ".md"
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def folder_sha256(folder: str | Path) -> str:
    """Content hash over the sorted relative paths and bytes of a model folder's files."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in _hashed_files(folder):
        relative = path.relative_to(folder).as_posix().encode()
        digest.update(len(relative).to_bytes(8, "big") + relative)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_spec(folder: str | Path) -> dict[str, Any] | None:
    """A model folder's edits.json (what the model was trained to do and its default settings,
    including `defaults.text_edit`, see `editing.text_edit.resolve_text_edit`), or None when the
    folder has none (stock Stable Diffusion / InstructPix2Pix folders)."""
    spec_file = Path(folder) / "edits.json"
    return json.loads(spec_file.read_text()) if spec_file.is_file() else None


def _model_id(folder: Path, spec: dict[str, Any] | None) -> str:
    """The spec's name; for a hub snapshot (models--org--name/snapshots/<rev>) "org/name"."""
    if spec is not None:
        return str(spec["model"])
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return folder.name


def load_model(
    path: str | Path | None = None,
    kind: str = "ip2p",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "float32",
) -> LoadedModel:
    """Load a local diffusers folder with the stock pipeline of its kind, never touching the network.

    `dtype` (a torch dtype or its name) is the compute dtype of every component. Learning needs
    float32; application also runs in bfloat16 (fast on GPUs and on CPUs with AMX / AVX512-BF16)
    or float16 (GPUs).
    """
    dtype = parse_dtype(dtype)
    if kind not in PIPELINES:
        raise ValueError(f"kind must be one of {sorted(PIPELINES)}, got {kind!r}")
    if path is not None and str(path).startswith("s3://"):
        raise ValueError(
            f"{path}: call storage.model_cache.materialise_model(uri) first; editing/ reads local folders"
        )
    folder = Path(path) if path is not None else shipped_model_dir(kind)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    import diffusers

    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(
        folder, dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    if pipe.unet.config.in_channels != UNET_IN_CHANNELS[kind]:
        raise ValueError(
            f"{folder}: UNet has {pipe.unet.config.in_channels} input channels; a {kind} model has "
            f"{UNET_IN_CHANNELS[kind]}"
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    spec = read_spec(folder)
    return LoadedModel(
        pipe=pipe,
        kind=kind,
        model_id=_model_id(folder, spec),
        sha256=folder_sha256(folder),
        path=folder,
        spec=spec,
    )
