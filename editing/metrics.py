"""Image-difference figures shared by learning, evaluation, QC and the benchmarks (one definition each)."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean PSNR in dB over a batch of [0, 1] images: per-image PSNR, then averaged.

    Per-image first, so one badly edited photo lowers the figure by its own share instead of being
    averaged away inside a pooled mean squared error. A single image (3-D tensor) is a batch of one.
    """
    if a.dim() == 3:
        a, b = a[None], b[None]
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())
