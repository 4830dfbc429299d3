"""Carry an edit made at the model's native resolution to the input's full resolution.

The editing models see a 64 px (or 512 px) copy of a photo that may be thousands of pixels wide.
Upscaling their output would throw away every detail the model never saw, so instead we explain the
low-resolution change as a smooth, spatially varying colour transform of the source (a local 3x3
affine colour matrix plus offset per pixel, fitted guided-filter style), upsample the transform's
coefficients, and apply them to the full-resolution source: the detail comes from the source, the
edit from the model. Whatever the affine model cannot express (a removed object, a vignette's local
falloff beyond the window) is added as a smooth residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _box(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)^2 window; at the borders only the pixels inside the image count."""
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def fit_local_affine(
    source: Tensor, edited: Tensor, radius: int = 2, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Per-pixel colour affine (A, b) with edited ~ A @ source + b in each window.

    Args:
        source, edited: (B, 3, h, w) in [0, 1].
        radius: window radius in low-res pixels; larger is smoother but less local.
        eps: ridge regulariser pulling A towards the identity: in flat regions (no colour variance
            to explain) the edit becomes a pure offset, which keeps the source's full-res detail,
            instead of a collapse towards the window mean (the plain guided filter's prior).

    Returns:
        A of shape (B, 3, 3, h, w) (row = output channel) and b of shape (B, 3, h, w), both already
        averaged over the windows covering each pixel (the guided filter's second pass), so that
        they are smooth and can be upsampled.
    """
    batch, channels, height, width = source.shape
    work = torch.float64
    src = source.to(work)
    dst = edited.to(work)
    mean_s = _box(src, radius)
    mean_d = _box(dst, radius)
    # cov_ss[c1, c2] and cov_ds[o, c] as (B, 9, h, w) stacks
    prod_ss = (src.unsqueeze(2) * src.unsqueeze(1)).reshape(batch, channels * channels, height, width)
    prod_ds = (dst.unsqueeze(2) * src.unsqueeze(1)).reshape(batch, channels * channels, height, width)
    cov_ss = _box(prod_ss, radius) - (mean_s.unsqueeze(2) * mean_s.unsqueeze(1)).reshape_as(prod_ss)
    cov_ds = _box(prod_ds, radius) - (mean_d.unsqueeze(2) * mean_s.unsqueeze(1)).reshape_as(prod_ds)
    cov_ss = cov_ss.permute(0, 2, 3, 1).reshape(-1, channels, channels)
    cov_ds = cov_ds.permute(0, 2, 3, 1).reshape(-1, channels, channels)
    eye = torch.eye(channels, dtype=work, device=source.device)
    # ridge towards identity: A (cov_ss + eps I) = cov_ds + eps I, solved as its transpose
    a_t = torch.linalg.solve((cov_ss + eps * eye).transpose(1, 2), (cov_ds + eps * eye).transpose(1, 2))
    matrix = a_t.transpose(1, 2).reshape(batch, height, width, channels, channels).permute(0, 3, 4, 1, 2)
    offset = mean_d - torch.einsum("bocxy,bcxy->boxy", matrix, mean_s)
    matrix = _box(matrix.reshape(batch, channels * channels, height, width), radius)
    offset = _box(offset, radius)
    return (
        matrix.reshape(batch, channels, channels, height, width).to(source.dtype),
        offset.to(source.dtype),
    )


def apply_local_affine(source: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """out[o] = sum_c A[o, c] * source[c] + b[o], per pixel; shapes (B,3,H,W), (B,3,3,H,W), (B,3,H,W)."""
    return torch.einsum("bocxy,bcxy->boxy", matrix, source) + offset


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def lift_edit(
    source_full: Tensor,
    source_small: Tensor,
    edited_small: Tensor,
    radius: int = 2,
    eps: float = 1e-4,
    residual: bool = True,
) -> Tensor:
    """The edit `source_small -> edited_small`, applied to `source_full` at its own resolution.

    Args:
        source_full: (3, H, W) float in [0, 1], the photo at the resolution to return.
        source_small: (3, h, w), the copy the model saw (an area downsample of `source_full`).
        edited_small: (3, h, w), the model's output for `source_small`.
        radius, eps: window radius (low-res pixels) and regulariser of the local affine fit.
        residual: also add the smooth part of what the affine model does not explain.

    Returns:
        (3, H, W) float in [0, 1].
    """
    if source_full.dim() != 3 or source_small.shape != edited_small.shape or source_small.dim() != 3:
        raise ValueError(
            "lift_edit expects source_full (3,H,W) and source_small/edited_small of one shape (3,h,w); "
            f"got {tuple(source_full.shape)}, {tuple(source_small.shape)}, {tuple(edited_small.shape)}"
        )
    full = source_full.unsqueeze(0)
    small = source_small.unsqueeze(0).to(full.dtype)
    edited = edited_small.unsqueeze(0).to(full.dtype)
    size = (full.shape[-2], full.shape[-1])
    matrix, offset = fit_local_affine(small, edited, radius=radius, eps=eps)
    batch, channels, _, height, width = matrix.shape
    matrix_full = _upsample(matrix.reshape(batch, channels * channels, height, width), size)
    out = apply_local_affine(full, matrix_full.reshape(batch, channels, channels, *size), _upsample(offset, size))
    if residual:
        explained = apply_local_affine(small, matrix, offset)
        out = out + _upsample(edited - explained, size)
    return out.clamp(0, 1).squeeze(0)
