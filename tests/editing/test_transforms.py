"""The retoucher presets of editing/transforms.py: vibrance boosts muted colours and spares skin."""

from __future__ import annotations

import numpy as np
import torch

from editing import quality
from editing.photos import load_photo
from editing.transforms import crisp, increase_contrast, saturate, vibrance


def _spread(x: torch.Tensor) -> torch.Tensor:
    return x.amax(1) - x.amin(1)


def _pixels(*rgb: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rgb).T.reshape(1, 3, len(rgb), 1)


def test_vibrance_lifts_muted_colours_more_than_vivid_ones_and_spares_skin_hues() -> None:
    muted_blue, vivid_blue, skin, grey = (0.45, 0.5, 0.58), (0.1, 0.3, 0.9), (0.85, 0.65, 0.5), (0.5, 0.5, 0.5)
    x = _pixels(muted_blue, vivid_blue, skin, grey)
    gain = (_spread(vibrance(x)) / _spread(x).clamp_min(1e-6)).flatten()
    assert gain[0] > 1.6 and gain[1] < 1.1  # muted +60% or more, vivid under +10%
    assert 1.0 < gain[2] < 1.0 + (gain[0] - 1.0) / 2  # skin gains, less than half as much
    assert torch.allclose(vibrance(x)[..., 3, :], x[..., 3, :])  # grey stays grey


def test_vibrance_is_continuous_in_colour() -> None:
    """A LUT has to fit it: no jump where the skin weight starts or ends."""
    ramp = torch.linspace(0, 1, 2001)
    x = torch.stack([torch.full_like(ramp, 0.8), 0.3 + 0.5 * ramp, torch.full_like(ramp, 0.3)]).view(1, 3, -1, 1)
    steps = (vibrance(x)[:, :, 1:] - vibrance(x)[:, :, :-1]).abs().max()
    assert steps < 0.01


def test_crisp_keeps_a_face_a_face_where_contrast_and_plain_saturation_do_not() -> None:
    portrait = load_photo("grace_hopper")
    x = torch.from_numpy(portrait).permute(2, 0, 1)[None].float() / 255
    source = x[0].permute(1, 2, 0).double().numpy()

    def skin(edit) -> float:
        return quality.skin_outliers(source, edit(x)[0].permute(1, 2, 0).double().numpy())

    assert skin(crisp) < 0.05
    assert skin(lambda y: saturate(increase_contrast(y))) > quality.FLAG_SKIN_OUTLIERS  # the old demo style
    assert np.isfinite(skin(crisp))
