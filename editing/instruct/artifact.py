"""The learned instruction as an artifact: its tensors, its metadata, and the bytes it is stored as.

An artifact is safetensors bytes plus JSON metadata. The metadata carries a content hash over both
and the hash of the model the instruction was learned on, so a modified artifact and an artifact
loaded with another model are refused instead of silently producing other edits.

torch is imported only for an instruction with a learned stage: a LUT-only instruction (or one loaded
`photometric_only`) is read with safetensors' numpy reader, so a process that only applies LUTs starts
without torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image
from safetensors.numpy import load as load_arrays

from editing.light_field import LightField, field_from_tensors, field_tensors
from editing.photometric import Lut, lut_from_tensors, lut_tensors

if TYPE_CHECKING:
    from torch import Tensor

    from editing.instruct.kv import InstructionKV

ARTIFACT_FORMAT = "catalogue-retouch/instruction"
ARTIFACT_VERSION = 1
# What an instruction does to a photo: its LUT alone, its LUT then its learned stage, or the learned
# stage alone. Every instruction carries its fitted LUT (QC compares outputs with LUT(source)).
ROUTES = ("lut", "lut+instructbrush", "instructbrush")
LUT_PREFIX = "lut."
FIELD_PREFIX = "field."


class InstructionModelMismatch(ValueError):
    """The instruction was learned on a different model than the one it is loaded with."""


class InstructionIntegrityError(ValueError):
    """The artifact's bytes or metadata do not match its recorded content hash."""


def pair_sha256(before: Image.Image, after: Image.Image) -> str:
    """Content hash of an exemplar pair's decoded RGB pixels and sizes.

    Hashing pixels rather than file bytes makes the hash a property of the pair, not of its files:
    re-encoding or re-uploading the same pixels keeps it, so every command that learns from the
    pair records the same `pairs[].sha256` and the refresh's learning cache stays valid.
    """
    digest = hashlib.sha256()
    for image in (before, after):
        digest.update(f"{image.width}x{image.height}".encode())
        digest.update(image.convert("RGB").tobytes())
    return digest.hexdigest()


@dataclass
class LearnedInstruction:
    """A learned instruction: its tensors plus everything needed to replay and audit it."""

    category: str
    space: str
    instruction: str
    num_tokens: int
    num_groups: int
    context: Tensor | None
    tensors: dict[str, Tensor]
    model_id: str
    model_sha256: str
    metadata: dict = field(default_factory=dict)
    sha256: str = ""
    route: str = "instructbrush"
    lut: Lut | None = None
    light_field: LightField | None = None

    @property
    def applicable(self) -> bool:
        """False for an instruction loaded with `photometric_only` (its learned tensors were left out)."""
        return not self.learned_stage or self.context is not None

    @property
    def learned_stage(self) -> bool:
        """Whether applying it runs the diffusion model (every route but the LUT alone)."""
        return self.route != "lut"

    @property
    def photometric_stage(self) -> bool:
        """Whether applying it starts with its photometric stage (the LUT, then the light field if any)."""
        return self.route in ("lut", "lut+instructbrush")

    def bank(self, pipe) -> InstructionKV:
        """The K/V bank of this instruction on `pipe`'s UNet, frozen for application."""
        from editing.instruct.kv import InstructionKV
        from editing.instruct.ops import encode_text

        if not self.learned_stage:
            raise ValueError(f"instruction {self.category!r} has route {self.route!r}: no learned stage")
        null = encode_text(pipe, [""])[0]
        unet = pipe.unet
        dtype = next(unet.parameters()).dtype
        context = self.context.to(unet.device, dtype)
        bank = InstructionKV(unet, context, null, self.num_tokens, self.space, self.num_groups)
        bank.load_named_tensors({k: v.to(unet.device, dtype) for k, v in self.tensors.items()})
        bank.freeze()
        return bank


def phrase_instruction(model, text: str, category: str = "") -> LearnedInstruction:
    """A plain text instruction in the same form as a learned one (nothing optimised)."""
    from editing.instruct.ops import count_instruction_tokens, encode_text

    pipe = model.pipe
    context = encode_text(pipe, [text])[0]
    num_tokens = max(1, count_instruction_tokens(pipe, text))
    rows = slice(1, 1 + num_tokens)
    return LearnedInstruction(
        category=category,
        space="text",
        instruction=text,
        num_tokens=num_tokens,
        num_groups=1,
        context=context.cpu(),
        tensors={"tokens": context[rows].cpu().clone()},
        model_id=model.model_id,
        model_sha256=model.sha256,
        metadata={"category": category, "space": "text", "instruction": text, "steps": 0},
    )


def check_model_binding(metadata: dict, model_id: str, model_sha256: str, model) -> None:
    """Raise `InstructionModelMismatch` unless `model` is the model the instruction was learned on."""
    if model_sha256 == model.sha256:
        return
    raise InstructionModelMismatch(
        f"instruction {metadata.get('category') or '(unnamed)'!r} was learned on model {model_id!r} "
        f"(sha256 {model_sha256[:12]}…) but the loaded model is {model.model_id!r} "
        f"(sha256 {model.sha256[:12]}…); learn it again on this model or load the model it was learned on"
    )


def _canonical(metadata: dict) -> bytes:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()


def _is_timing(field: str) -> bool:
    """Wall-clock figures (`wall_time_s`, `route_wall_time_s`): kept in the sidecar, left out of the
    content hash, so two identical learning runs give the same `content_sha256`."""
    return field.endswith("time_s")


def _content_hash(data: bytes, metadata: dict) -> str:
    hashed = {k: v for k, v in metadata.items() if k != "content_sha256" and not _is_timing(k)}
    return hashlib.sha256(data + b"\x00" + _canonical(hashed)).hexdigest()


def _legacy_content_hash(data: bytes, metadata: dict) -> str:
    """The hash of artifacts written before timings were left out; still accepted when loading."""
    unsigned = {k: v for k, v in metadata.items() if k != "content_sha256"}
    return hashlib.sha256(data + b"\x00" + _canonical(unsigned)).hexdigest()


def save_instruction(instruction: LearnedInstruction) -> tuple[bytes, dict]:
    """(safetensors bytes, JSON-serialisable metadata); the metadata carries a content hash over
    both, so neither can be altered unnoticed. Also sets `instruction.sha256`."""
    from safetensors.torch import save

    if instruction.route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {instruction.route!r}")
    if instruction.photometric_stage and instruction.lut is None:
        raise ValueError(f"route {instruction.route!r} needs a LUT")
    tensors = dict(instruction.tensors)
    if instruction.learned_stage:
        tensors["context"] = instruction.context
    if instruction.lut is not None:
        tensors.update(lut_tensors(instruction.lut, LUT_PREFIX))
    if instruction.light_field is not None:
        if not instruction.photometric_stage:
            raise ValueError(f"route {instruction.route!r} has no photometric stage to carry a light field")
        tensors.update(field_tensors(instruction.light_field, FIELD_PREFIX))
    data = save({k: v.detach().contiguous().float().cpu() for k, v in tensors.items()})
    metadata = copy.deepcopy(instruction.metadata)
    metadata.update(
        route=instruction.route,
        lut_size=int(instruction.lut.size) if instruction.lut is not None else None,
    )
    metadata.pop("light_field_grid", None)
    if instruction.light_field is not None:
        metadata["light_field_grid"] = int(instruction.light_field.grid)
    metadata.update(
        format=ARTIFACT_FORMAT,
        version=ARTIFACT_VERSION,
        category=instruction.category,
        space=instruction.space,
        instruction=instruction.instruction,
        num_tokens=instruction.num_tokens,
        num_groups=instruction.num_groups,
        model_id=instruction.model_id,
        model_sha256=instruction.model_sha256,
    )
    metadata["content_sha256"] = _content_hash(data, metadata)
    instruction.sha256 = metadata["content_sha256"]
    return data, metadata


def check_tensors(tensors: dict[str, Tensor], metadata: dict, model) -> None:
    """Refuse an artifact whose tensors are not exactly what `model` takes for its space.

    The content hash is unkeyed: it catches corruption and mismatched files, not a deliberate edit
    with the hash recomputed. This check bounds what such an edit can do: every tensor's name, shape
    and dtype must be the model's (a wrong shape would otherwise be broadcast), and nothing extra.
    """
    import torch

    from editing.instruct.kv import SPACES, cross_attention_layers

    try:
        space, num_tokens, num_groups = metadata["space"], int(metadata["num_tokens"]), int(metadata["num_groups"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InstructionIntegrityError(f"instruction metadata incomplete: {exc!r}") from None
    text_encoder, length = model.pipe.text_encoder, model.pipe.tokenizer.model_max_length
    width = text_encoder.config.hidden_size
    if space not in SPACES or not 1 <= num_tokens <= length - 2 or not 1 <= num_groups <= 1000:
        raise InstructionIntegrityError(
            f"instruction metadata out of range: space={space!r}, num_tokens={num_tokens}, num_groups={num_groups}"
        )
    expected = {"context": (length, width)}
    if space == "text":
        expected["tokens"] = (num_tokens, width)
    else:
        for name, attn in cross_attention_layers(model.pipe.unet).items():
            expected[f"keys/{name}"] = (num_groups, length, attn.to_k.out_features)
            expected[f"values/{name}"] = (num_groups, length, attn.to_v.out_features)
    if extra := sorted(set(tensors) - set(expected)):
        raise InstructionIntegrityError(f"instruction has tensors this model does not take: {extra[:5]}")
    for name, shape in expected.items():
        if name not in tensors:
            raise InstructionIntegrityError(f"instruction lacks tensor {name!r}")
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != torch.float32:
            raise InstructionIntegrityError(
                f"instruction tensor {name!r} is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                f"this model takes {shape} torch.float32"
            )


def _split_lut(tensors: dict[str, Tensor], metadata: dict) -> Lut | None:
    """Take the LUT's tensors out of `tensors` and check them against the metadata's LUT size."""
    names = [k for k in tensors if k.startswith(LUT_PREFIX)]
    if not names:
        return None
    try:
        lut = lut_from_tensors({k: tensors.pop(k) for k in names}, LUT_PREFIX)
    except ValueError as exc:
        raise InstructionIntegrityError(f"instruction LUT unreadable: {exc}") from None
    if len(names) != 2 or lut.size != metadata.get("lut_size"):
        raise InstructionIntegrityError(
            f"instruction LUT is {lut.size}^3 with tensors {sorted(names)}, metadata says lut_size="
            f"{metadata.get('lut_size')!r}"
        )
    return lut


def _split_field(tensors: dict[str, Tensor], metadata: dict) -> LightField | None:
    """Take the light field's tensors out of `tensors` and check them against the metadata's grid."""
    names = [k for k in tensors if k.startswith(FIELD_PREFIX)]
    if not names:
        if metadata.get("light_field_grid") is not None:
            raise InstructionIntegrityError("instruction metadata names a light field the artifact lacks")
        return None
    try:
        light_field = field_from_tensors({k: tensors.pop(k) for k in names}, FIELD_PREFIX)
    except ValueError as exc:
        raise InstructionIntegrityError(f"instruction light field unreadable: {exc}") from None
    if len(names) != 2 or light_field.grid != metadata.get("light_field_grid"):
        raise InstructionIntegrityError(
            f"instruction light field is {light_field.grid}x{light_field.grid} with tensors {sorted(names)}, "
            f"metadata says light_field_grid={metadata.get('light_field_grid')!r}"
        )
    return light_field


def load_instruction(
    data: bytes, metadata: dict, model=None, *, photometric_only: bool = False
) -> LearnedInstruction:
    """Verify the artifact's content hash and its model binding, then rebuild the instruction.

    An instruction whose route is the LUT alone never touches the model, so `model` may be None for
    it; every other route is checked against the model it is loaded with. `photometric_only` loads
    the LUT and metadata alone, without the model (for QC, which never runs the learned stage); such
    an instruction refuses to be applied.
    """
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise InstructionIntegrityError(
            f"not a {ARTIFACT_FORMAT} artifact (format={metadata.get('format')!r})"
        )
    if metadata.get("content_sha256") not in (_content_hash(data, metadata), _legacy_content_hash(data, metadata)):
        raise InstructionIntegrityError(
            "instruction artifact does not match its content hash: the safetensors bytes or the metadata "
            "were modified or belong to different artifacts"
        )
    route = metadata.get("route", "instructbrush")
    if route not in ROUTES:
        raise InstructionIntegrityError(f"instruction route {route!r} is not one of {ROUTES}")
    photometric = route == "lut" or photometric_only
    if photometric:
        tensors = load_arrays(data)
    else:
        from safetensors.torch import load as load_tensors

        tensors = load_tensors(data)
    lut = _split_lut(tensors, metadata)
    light_field = _split_field(tensors, metadata)
    if light_field is not None and route == "instructbrush":
        raise InstructionIntegrityError("an instructbrush instruction has no photometric stage for its light field")
    if route != "instructbrush" and lut is None:
        raise InstructionIntegrityError(f"instruction route {route!r} needs a LUT and the artifact has none")
    if route == "lut" and tensors:
        raise InstructionIntegrityError(f"a LUT-only instruction has extra tensors: {sorted(tensors)[:5]}")
    if photometric:
        context, tensors = None, {}
    else:
        if model is None:
            raise ValueError(f"instruction route {route!r} runs the diffusion model: load it with the model")
        check_model_binding(metadata, metadata["model_id"], metadata["model_sha256"], model)
        check_tensors(tensors, metadata, model)
        context = tensors.pop("context")
    return LearnedInstruction(
        category=metadata["category"],
        space=metadata["space"],
        instruction=metadata["instruction"],
        num_tokens=int(metadata["num_tokens"]),
        num_groups=int(metadata["num_groups"]),
        context=context,
        tensors=tensors,
        model_id=metadata["model_id"],
        model_sha256=metadata["model_sha256"],
        metadata=metadata,
        sha256=metadata["content_sha256"],
        route=route,
        lut=lut,
        light_field=light_field,
    )
