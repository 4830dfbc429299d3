"""Carry a text edit made at the model's native size to the photo's own resolution.

The t2i model edits a 64 px (or 512 px) copy of the photo. Two ways bring that edit back to the
full-size photo, and they keep different things:

- `lift`: the local colour affine of `editing.lift.lift_edit` (plus its smooth residual). It
  carries whatever the model changed where it changed it, a vignette's corners or a blur's softness
  as much as a colour shift, and also the model's drift: a cheek that went pink in one place, a
  texture the model invented.
- `colour`: one 3D LUT fitted on the native pair (`editing.photometric.fit_lut`, as the learned
  route's photometric stage), applied to every pixel of the full-size photo. It carries what the
  edit means as a function of colour, the same everywhere, so a global style caption ("a warm
  photo") keeps every pixel of the photo and the model's local drift averages out; it cannot carry
  anything spatial.

Which one an edit uses is the model's business, like its guidance (`editing.text_edit`):
`resolve_carry` takes the caller's choice, else the model folder's edits.json, per caption (an
edit whose `caption` is the target prompt may say `"carry": "colour"`) and then for every other
caption (`defaults.text_edit.carry`), else `lift`, which carries everything the model did.

The shipped t2i's choices were measured on training photos only (`defaults.text_edit.carry_calibration`
in its edits.json); the held-out figures are in benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from editing.lift import lift_edit
from editing.photometric import apply_lut, fit_lut

CARRY_MODES = ("lift", "colour")
FALLBACK_CARRY = "lift"
CARRY_LUT_SIZE = 17


@dataclass(frozen=True)
class CarriedEdit:
    """`image`: (3, H, W) in [0, 1] at the photo's resolution; `mode`: "lift" or "colour";
    `colour_explains`: with "colour", the share of the native change the LUT reproduces (what the
    carry kept of the model's edit; the rest was drift or spatial), else None."""

    image: Tensor
    mode: str
    colour_explains: float | None

    def record(self) -> dict:
        return {"carry": self.mode, "colour_explains": self.colour_explains}


def colour_explains(source_small: Tensor, edited_small: Tensor, carried_small: Tensor) -> float:
    """1 - |edited - carried|^2 / |edited - source|^2 at the native size: 1 when the colour
    transform reproduces the model's change exactly, 0 (or below) when it explains none of it.
    An edit that changed nothing counts as fully explained."""
    change = (edited_small - source_small).double().pow(2).mean()
    if change <= 1e-12:
        return 1.0
    return float(1 - (edited_small - carried_small).double().pow(2).mean() / change)


@torch.no_grad()
def carry_edit(source_full: Tensor, source_small: Tensor, edited_small: Tensor, mode: str) -> CarriedEdit:
    """The native-size edit `source_small -> edited_small` applied to `source_full`.

    Args:
        source_full: (3, H, W) float in [0, 1], the photo at the resolution to return.
        source_small: (3, h, w), the copy the model saw (an area downsample of `source_full`).
        edited_small: (3, h, w), the model's output for `source_small`.
        mode: "lift" or "colour" (see the module docstring; `resolve_carry` picks it).
    """
    if mode not in CARRY_MODES:
        raise ValueError(f"carry mode must be one of {CARRY_MODES}, got {mode!r}")
    if source_full.dim() != 3 or source_small.dim() != 3 or source_small.shape != edited_small.shape:
        raise ValueError(
            "carry_edit expects source_full (3,H,W) and source_small/edited_small of one shape (3,h,w); "
            f"got {tuple(source_full.shape)}, {tuple(source_small.shape)}, {tuple(edited_small.shape)}"
        )
    source_small = source_small.to(source_full)
    edited_small = edited_small.to(source_full)
    if mode == "lift":
        return CarriedEdit(lift_edit(source_full, source_small, edited_small), "lift", None)
    lut = fit_lut([(source_small.clamp(0, 1), edited_small.clamp(0, 1))], size=CARRY_LUT_SIZE)
    explains = colour_explains(source_small, edited_small, apply_lut(lut, source_small))
    return CarriedEdit(apply_lut(lut, source_full).to(source_full.dtype), "colour", explains)


def _caption(text: str) -> str:
    return " ".join(text.lower().split())


def check_carry(value: Any, where: str) -> str:
    if value not in CARRY_MODES:
        raise ValueError(f"{where} must be one of {CARRY_MODES}, got {value!r}")
    return value


def resolve_carry(
    spec: Mapping[str, Any] | None, target_prompt: str, requested: str | None = None
) -> tuple[str, str]:
    """(mode, origin): the caller's `requested` mode ("caller"), else the model's edits.json entry
    whose caption is `target_prompt` (case and spacing ignored; "model caption"), else the model's
    `defaults.text_edit.carry` ("model"), else `FALLBACK_CARRY` ("default"). Pure: reads nothing."""
    if requested is not None:
        return check_carry(requested, "carry"), "caller"
    spec = spec or {}
    name = spec.get("model", "model")
    for index, edit in enumerate(spec.get("edits") or []):
        if "carry" in edit and _caption(str(edit.get("caption", ""))) == _caption(target_prompt):
            return check_carry(edit["carry"], f"{name}: edits.json edits[{index}].carry"), "model caption"
    default = ((spec.get("defaults") or {}).get("text_edit") or {}).get("carry")
    if default is not None:
        return check_carry(default, f"{name}: edits.json defaults.text_edit.carry"), "model"
    return FALLBACK_CARRY, "default"
