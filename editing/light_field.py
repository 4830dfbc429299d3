"""A light field: the smooth, position-dependent part of a photometric edit that a colour LUT cannot
hold (a vignette, a radial or graduated filter, a dodge or burn in a fixed place of the frame).

The model is a per-pixel affine of each channel, shared by the three channels so that it changes
light, not colour: ``out_c(p) = gain(p) * in_c(p) + offset(p)``, with `gain` and `offset` bilinear
over a `grid` x `grid` lattice in normalised frame coordinates (so one field fits every aspect ratio
and resolution, like a preset's radial filter). A vignette is a gain below 1 at the corners; a dodge
(``x + w (1 - x)``) is exactly gain ``1 - w`` and offset ``w``.

It is fitted in closed form by regularised least squares on pairs (the LUT's output, the
retoucher's after) at a small working size, pulled towards identity and towards a smooth field;
`choose_light_field` keeps it only when leave-one-pair-out scores say it helps on pairs it was not
fitted on. No I/O. Fitting and tensors use torch; a field is stored as numpy arrays and applied to a
photo with numpy, so a process that only applies photometric stages starts without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from editing.arrays import float32_array, is_tensor, row_strips, strip_pool

if TYPE_CHECKING:
    from torch import Tensor

GRID = 9
WORK_SIZE = 64
SMOOTHNESS = 1e-3
RIDGE = 1e-5
_CLIP = 1.5 / 255
# Above this PSNR the error left is about 1/255 RMS: no light a retoucher could see is missing, and a
# fitted field would only chase quantisation (the demo's contrast grade won +0.64 dB at 57 dB).
INVISIBLE_DB = 45.0


@dataclass
class LightField:
    """`gain` and `offset`, each (grid, grid) float32 numpy arrays (tensors given to the constructor
    are converted), rows top to bottom, columns left to right."""

    gain: np.ndarray
    offset: np.ndarray

    def __post_init__(self) -> None:
        self.gain, self.offset = float32_array(self.gain), float32_array(self.offset)
        if self.gain.ndim != 2 or self.gain.shape != self.offset.shape or self.gain.shape[0] != self.gain.shape[1]:
            raise ValueError(f"a light field is two (grid, grid) maps, got {tuple(self.gain.shape)} and "
                             f"{tuple(self.offset.shape)}")
        if self.gain.shape[0] < 2:
            raise ValueError("a light field needs at least 2 nodes per axis")
        if not (np.isfinite(self.gain).all() and np.isfinite(self.offset).all()):
            raise ValueError("a light field holds non-finite values")

    @property
    def grid(self) -> int:
        return self.gain.shape[0]


def _to_tensor(image: Image.Image | Tensor) -> Tensor:
    import torch

    if isinstance(image, Image.Image):
        data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255
    return image.float()


def _work(image: Image.Image | Tensor, size: int) -> Tensor:
    """(3, h, w) float at most `size` px on its longer side (area average, aspect kept)."""
    import torch.nn.functional as F

    x = _to_tensor(image)
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    if scale >= 1:
        return x
    shape = (max(2, round(height * scale)), max(2, round(width * scale)))
    return F.interpolate(x[None], size=shape, mode="area")[0]


def _hat(length: int, grid: int) -> Tensor:
    """(length, grid) float64 tensor: `_hat_weights` for the fit."""
    import torch

    return torch.from_numpy(_hat_weights(length, grid, np.float64))


def _basis(height: int, width: int, grid: int) -> Tensor:
    """(height * width, grid * grid) bilinear basis; row p holds the weights of pixel p's four nodes."""
    import torch

    return torch.einsum("im,jn->ijmn", _hat(height, grid), _hat(width, grid)).reshape(height * width, grid * grid)


def _second_differences(grid: int) -> Tensor:
    """(n, grid * grid) second differences of a lattice map, along its rows and along its columns."""
    import torch

    rows = []
    for i in range(grid):
        for j in range(1, grid - 1):
            for a, b, c in (((i, j - 1), (i, j), (i, j + 1)), ((j - 1, i), (j, i), (j + 1, i))):
                row = torch.zeros(grid, grid, dtype=torch.float64)
                row[a], row[b], row[c] = 1, -2, 1
                rows.append(row.flatten())
    return torch.stack(rows)


def _normal_equations(source, target, grid: int, work_size: int, index: int = 0) -> tuple[Tensor, Tensor, int]:
    """One pair's share of the least-squares problem: (design^T design, design^T residual, samples)
    over all channels of its pixels at `work_size`, clipped target pixels left out."""
    import torch

    x, y = _work(source, work_size).double(), _work(target, work_size).double()
    if x.shape != y.shape:
        raise ValueError(f"pair {index}: input {tuple(x.shape[-2:])} and target {tuple(y.shape[-2:])} differ in size")
    basis = _basis(*x.shape[-2:], grid)
    normal = torch.zeros(2 * grid * grid, 2 * grid * grid, dtype=torch.float64)
    rhs = torch.zeros(2 * grid * grid, dtype=torch.float64)
    count = 0
    for channel in range(3):
        xc, yc = x[channel].flatten(), y[channel].flatten()
        keep = (yc > _CLIP) & (yc < 1 - _CLIP)
        design = torch.cat([basis[keep] * xc[keep, None], basis[keep]], dim=1)
        normal += design.T @ design
        rhs += design.T @ (yc[keep] - xc[keep])
        count += int(keep.sum())
    return normal, rhs, count


def _solve(shares: Sequence[tuple[Tensor, Tensor, int]], grid: int, smoothness: float) -> LightField:
    """The field from the pairs' summed normal equations, with the ridge and smoothness prior."""
    import torch

    unknowns = grid * grid
    normal, rhs = sum(share[0] for share in shares), sum(share[1] for share in shares)
    scale = max(sum(share[2] for share in shares), 1) / unknowns
    differences = _second_differences(grid)
    penalty = differences.T @ differences
    regulariser = torch.block_diag(penalty, penalty) * smoothness * scale
    regulariser += torch.eye(2 * unknowns, dtype=torch.float64) * RIDGE * scale
    solution = torch.linalg.solve(normal + regulariser, rhs)
    return LightField(1 + solution[:unknowns].reshape(grid, grid), solution[unknowns:].reshape(grid, grid))


def fit_light_field(
    pairs: Sequence[tuple[Image.Image | Tensor, Image.Image | Tensor]],
    grid: int = GRID,
    smoothness: float = SMOOTHNESS,
    work_size: int = WORK_SIZE,
) -> LightField:
    """The field that best maps each pair's input to its target (least squares over all channels of
    all pixels at `work_size`, clipped target pixels left out), pulled towards identity by a small
    ridge and towards a smooth field by `smoothness` times the data weight."""
    if not pairs:
        raise ValueError("fit_light_field needs at least one pair")
    return _solve([_normal_equations(s, t, grid, work_size, i) for i, (s, t) in enumerate(pairs)], grid, smoothness)


def apply_light_field(field: LightField, image: Image.Image | Tensor) -> Image.Image | Tensor:
    """The field applied at the image's own resolution: a PIL image gives an 8-bit PIL image, a float
    tensor (3, H, W) or (B, 3, H, W) a float tensor, clipped to [0, 1]."""
    if isinstance(image, Image.Image):
        return _apply_8bit(field, image.convert("RGB"))
    if not is_tensor(image):
        raise TypeError(f"apply_light_field takes a PIL image or a tensor, got {type(image).__name__}")
    gain, offset = _maps(field, *image.shape[-2:], image.device)
    return (image.float() * gain + offset).clamp(0, 1).to(image.dtype)


def _maps(field: LightField, height: int, width: int, device=None) -> tuple[Tensor, Tensor]:
    """Gain and offset at every pixel, (height, width) each: bilinear from the lattice."""
    import torch
    import torch.nn.functional as F

    maps = torch.tensor(np.stack([field.gain, field.offset]))[None].to(device, torch.float32)
    gain, offset = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=True)[0]
    return gain, offset


def _hat_weights(length: int, grid: int, dtype=np.float32) -> np.ndarray:
    """(length, grid): the weights bilinear interpolation (align_corners) gives each lattice node,
    node m's tent function read at `length` evenly spaced positions from the first node to the last."""
    positions = np.linspace(0.0, grid - 1.0, length)
    nodes = np.arange(grid, dtype=np.float64)
    return np.clip(1.0 - np.abs(positions[:, None] - nodes[None, :]), 0.0, None).astype(dtype)


def _apply_8bit(field: LightField, image: Image.Image, threads: int = 2) -> Image.Image:
    """The PIL path, in numpy, in horizontal strips on `threads` threads (numpy releases the GIL). A
    photo is seen as (H, W*3) values, so the maps are built with each pixel's weights repeated for its
    three channels and every pass runs over contiguous memory (a (H, W, 1) broadcast ran 4x slower).
    The maps are separable, rows x lattice x columns: each strip computes its own rows of them."""
    height, width = image.height, image.width
    source = np.asarray(image).reshape(height, width * 3)
    rows = _hat_weights(height, field.grid)
    columns = np.repeat(_hat_weights(width, field.grid), 3, axis=0)  # (W*3, grid)
    gain_columns, offset_columns = field.gain @ columns.T, (field.offset * 255) @ columns.T
    out = np.empty_like(source)

    def strip(bounds: tuple[int, int]) -> None:
        top, bottom = bounds
        block = source[top:bottom].astype(np.float32)
        block *= rows[top:bottom] @ gain_columns
        block += rows[top:bottom] @ offset_columns
        np.clip(block, 0, 255, out=block)
        block += 0.5
        out[top:bottom] = block  # truncation after +0.5: round half up

    if threads <= 1:
        strip((0, height))
    else:
        list(strip_pool(threads).map(strip, row_strips(height, threads)))
    return Image.fromarray(out.reshape(height, width, 3))


def choose_light_field(
    pairs: Sequence[tuple[Image.Image | Tensor, Image.Image | Tensor]],
    grid: int = GRID,
    margin_db: float = 0.5,
    work_size: int = WORK_SIZE,
) -> tuple[LightField | None, dict]:
    """Fit a field on all pairs and keep it only if, leaving each pair out in turn, the field fitted
    on the others raises that pair's PSNR by at least `margin_db` on average, and the pairs are not
    already reproduced beyond `INVISIBLE_DB` without it. Returns the field (or
    None) and the figures: mean held-out PSNR without and with it, and the decision."""
    from editing.metrics import psnr

    if len(pairs) < 3:
        return None, {"used": False, "reason": f"{len(pairs)} pairs: too few to check a light field on held-out pairs"}
    without, with_field = [], []
    # Each pair's normal equations once; a fold sums the others' (no pair is downsampled twice).
    shares = [_normal_equations(s, t, grid, work_size, i) for i, (s, t) in enumerate(pairs)]
    scored = [(_work(s, 2 * work_size), _work(t, 2 * work_size)) for s, t in pairs]
    for index, (source, target) in enumerate(scored):
        field = _solve([share for i, share in enumerate(shares) if i != index], grid, SMOOTHNESS)
        without.append(psnr(source, target))
        with_field.append(psnr(apply_light_field(field, source), target))
    mean_without, mean_with = sum(without) / len(without), sum(with_field) / len(with_field)
    gain = mean_with - mean_without
    invisible = mean_without >= INVISIBLE_DB
    used = gain >= margin_db and not invisible
    reason = f"leave-one-pair-out gain {gain:+.2f} dB ({'>=' if gain >= margin_db else '<'} margin {margin_db} dB)"
    if invisible:
        reason += f"; without a field the pairs are already reproduced at {mean_without:.1f} dB (>= {INVISIBLE_DB} dB)"
    report = {
        "used": used, "grid": grid, "held_out_psnr_without": round(mean_without, 3),
        "held_out_psnr_with": round(mean_with, 3), "gain_db": round(gain, 3), "margin_db": margin_db,
        "reason": reason,
    }
    return (_solve(shares, grid, SMOOTHNESS) if used else None), report


def field_tensors(field: LightField, prefix: str = "field.") -> dict[str, Tensor]:
    """The field as named float32 tensors for a safetensors file."""
    import torch

    return {f"{prefix}gain": torch.from_numpy(field.gain.copy()), f"{prefix}offset": torch.from_numpy(field.offset.copy())}


def field_from_tensors(tensors: dict[str, Tensor | np.ndarray], prefix: str = "field.") -> LightField:
    """The inverse of `field_tensors`; numpy arrays (safetensors.numpy) are taken too."""
    try:
        return LightField(tensors[f"{prefix}gain"], tensors[f"{prefix}offset"])
    except KeyError as missing:
        raise ValueError(f"no light field under prefix {prefix!r}: {missing} missing") from None


def remove_light_field(field: LightField, image: Image.Image | Tensor) -> Image.Image | Tensor:
    """The inverse of `apply_light_field` where it has one (gain floored at 0.05 so a black corner
    does not divide by zero): what the image was before the field, for refitting the colour under it."""
    if isinstance(image, Image.Image):
        out = remove_light_field(field, _to_tensor(image))
        return Image.fromarray(out.mul(255).round().byte().permute(1, 2, 0).numpy())
    gain, offset = _maps(field, *image.shape[-2:], image.device)
    return ((image.float() - offset) / gain.clamp_min(0.05)).clamp(0, 1).to(image.dtype)
