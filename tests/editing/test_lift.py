"""lift_edit must carry a low-resolution edit to full resolution without losing the source's detail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from editing.lift import fit_local_affine, lift_edit
from editing.photos import load_photo
from editing.transforms import EDITS


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(load_photo("coffee")).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize(("edit", "min_psnr"), [("warm", 40.0), ("sepia", 38.0), ("brighten", 34.0),
                                                 ("grayscale", 40.0), ("increase_contrast", 30.0)])
def test_global_colour_edit_lifted_matches_full_resolution_ground_truth(
    photo: torch.Tensor, edit: str, min_psnr: float
) -> None:
    transform = EDITS[edit].function
    small = F.interpolate(photo[None], size=(64, 64), mode="area")[0]
    truth = transform(photo[None])[0]
    lifted = lift_edit(photo, small, transform(small[None])[0])
    upscaled = F.interpolate(transform(small[None]), size=photo.shape[-2:], mode="bilinear")[0]

    assert lifted.shape == photo.shape
    assert _psnr(lifted, truth) >= min_psnr
    # a blurry upscale of the native output is at least 8 dB worse: the detail comes from the source
    assert _psnr(lifted, truth) >= _psnr(upscaled, truth) + 8.0


def test_identity_edit_returns_the_source(photo: torch.Tensor) -> None:
    small = F.interpolate(photo[None], size=(64, 64), mode="area")[0]
    assert _psnr(lift_edit(photo, small, small), photo) > 50.0


def test_local_affine_recovers_an_exact_colour_matrix() -> None:
    torch.manual_seed(0)
    source = torch.rand(1, 3, 16, 16)
    matrix = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.7]])
    edited = torch.einsum("oc,bchw->bohw", matrix, source) + 0.05
    fitted, offset = fit_local_affine(source, edited, radius=2, eps=1e-8)
    assert torch.allclose(fitted[0, :, :, 8, 8], matrix, atol=1e-3)
    assert torch.allclose(offset[0, :, 8, 8], torch.full((3,), 0.05), atol=1e-3)


def test_shape_mismatch_is_refused(photo: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="lift_edit expects"):
        lift_edit(photo, torch.zeros(3, 64, 64), torch.zeros(3, 32, 32))
