"""The photometric stage: a LUT fitted from pairs recovers a global grade on photos it never saw,
applies identically through Pillow and torch at any size, and survives .cube and safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from editing.metrics import psnr
from editing.photometric import (
    Lut,
    apply_lut,
    cube_bytes,
    fit_lut,
    identity_lut,
    lut_from_cube_bytes,
    lut_from_tensors,
    lut_tensors,
    read_cube,
    write_cube,
)
from editing.photos import sample_photos
from editing.transforms import EDITS

SIDE = 128


def _small(photo: np.ndarray) -> torch.Tensor:
    image = Image.fromarray(photo)
    image = image.resize((SIDE, round(SIDE * image.height / image.width)), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _quantised(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round() / 255


@pytest.fixture(scope="module")
def train() -> list[torch.Tensor]:
    return [_small(photo) for photo in sample_photos("train").values()]


@pytest.fixture(scope="module")
def heldout() -> list[torch.Tensor]:
    return [_small(photo) for photo in sample_photos("heldout").values()]


def _grade(name: str, x: torch.Tensor) -> torch.Tensor:
    return _quantised(EDITS[name].function(x[None])[0])


@pytest.fixture(scope="module")
def warm_lut(train) -> Lut:
    return fit_lut([(x, _grade("warm", x)) for x in train])


@pytest.mark.parametrize("grade", ["warm", "saturate", "increase_contrast", "sepia"])
def test_fit_recovers_a_global_grade_on_heldout_photos(grade, train, heldout):
    lut = fit_lut([(x, _grade(grade, x)) for x in train], size=17)
    truth = torch.stack([_grade(grade, x) for x in heldout])
    sources = torch.stack(heldout)
    fitted = psnr(_quantised(apply_lut(lut, sources)), truth)
    assert fitted >= 38.0
    assert psnr(sources, truth) < 30.0  # the grade is real: doing nothing is far off


def test_default_size_fit_recovers_warm_on_heldout_photos(warm_lut, heldout):
    assert warm_lut.size == 33
    sources = torch.stack(heldout)
    assert psnr(_quantised(apply_lut(warm_lut, sources)), torch.stack([_grade("warm", x) for x in heldout])) >= 38.0


def test_fit_is_deterministic(train):
    pairs = [(x, _grade("warm", x)) for x in train]
    assert np.array_equal(fit_lut(pairs, size=17).table, fit_lut(pairs, size=17).table)


def test_large_pairs_are_subsampled_deterministically(train):
    pairs = [(x, _grade("cool", x)) for x in train[:3]]
    first = fit_lut(pairs, size=9, max_pixels=2_000, seed=3)
    assert np.array_equal(first.table, fit_lut(pairs, size=9, max_pixels=2_000, seed=3).table)
    assert not np.array_equal(first.table, fit_lut(pairs, size=9, max_pixels=2_000, seed=4).table)
    everything = fit_lut(pairs, size=9)
    assert np.abs(first.table - everything.table).mean() < 0.01


def _reds_only() -> torch.Tensor:
    """r in [0.6, 1], g and b in [0, 0.3]: the blue, green and white corners never appear."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.uniform([0.6, 0, 0], [1.0, 0.3, 0.3], (64, 64, 3))).permute(2, 0, 1).float()


FAR_NODES = [(0, 0, 16), (0, 16, 0), (0, 16, 16), (16, 16, 16), (0, 0, 0)]


def test_unseen_colours_follow_the_grades_global_colour_matrix():
    before = _reds_only()  # cool is a pure gain: no clipping inside the data, one colour matrix
    lut = fit_lut([(before, EDITS["cool"].function(before[None])[0])], size=17)
    nodes = torch.from_numpy(identity_lut(17).table)
    for node in FAR_NODES:
        truth = EDITS["cool"].function(nodes[node].view(1, 3, 1, 1)).flatten().numpy()
        assert np.abs(lut.table[node] - truth).max() < 0.02, node
    assert lut.table[16, 2, 2, 0] == pytest.approx(0.84, abs=0.01)  # inside the data


def test_unseen_colours_stay_close_to_identity_with_the_identity_base():
    before = _reds_only()
    lut = fit_lut([(before, EDITS["warm"].function(before[None])[0])], size=17, base="identity")
    identity = identity_lut(17).table
    for node in FAR_NODES:
        assert np.abs(lut.table[node] - identity[node]).max() < 0.04, node  # 0.07 with base_pull=1e-6
    assert lut.table[16, 2, 2, 2] == pytest.approx(0.125 * 0.82, abs=0.01)


def test_unedited_pairs_give_the_identity_even_from_one_flat_colour():
    flat = torch.full((3, 16, 16), 0.5)
    photo = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    for before in (flat, photo):
        lut = fit_lut([(before, before.clone())], size=9)
        assert np.abs(lut.table - identity_lut(9).table).max() < 1e-3


def test_fit_refuses_bad_pairs():
    with pytest.raises(ValueError, match="at least one"):
        fit_lut([])
    with pytest.raises(ValueError, match="differ in size"):
        fit_lut([(torch.rand(3, 8, 8), torch.rand(3, 8, 9))])


@pytest.mark.parametrize("height, width", [(1, 1), (37, 53), (101, 3)])
def test_apply_keeps_odd_resolutions_and_the_identity(height, width):
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
    out = apply_lut(identity_lut(), x)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6)
    image = Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())
    out_image = apply_lut(identity_lut(), image)
    assert out_image.size == (width, height)
    assert np.abs(np.asarray(out_image, dtype=int) - np.asarray(image, dtype=int)).max() <= 1


def test_pillow_and_grid_sample_agree_within_one_level(warm_lut):
    lut = Lut(torch.rand(17, 17, 17, 3, generator=torch.Generator().manual_seed(0)), identity_lut().domain)
    x = torch.randint(0, 256, (3, 61, 47), generator=torch.Generator().manual_seed(1)).float() / 255
    image = Image.fromarray((x * 255).byte().permute(1, 2, 0).numpy())
    for table in (lut, warm_lut):
        by_torch = (apply_lut(table, x) * 255).round()
        by_pillow = torch.from_numpy(np.asarray(apply_lut(table, image), dtype=np.float32)).permute(2, 0, 1)
        assert (by_torch - by_pillow).abs().max() <= 1


def test_pillow_strips_match_one_pass(warm_lut):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 20, 3), dtype=np.uint8))
    one = np.asarray(apply_lut(warm_lut, image, threads=1))
    assert np.array_equal(one, np.asarray(apply_lut(warm_lut, image, threads=3)))


def test_batched_tensor_matches_one_by_one(warm_lut, heldout):
    batch = torch.stack([x[:, :64, :96] for x in heldout])
    one_by_one = torch.stack([apply_lut(warm_lut, x) for x in batch])
    assert torch.allclose(apply_lut(warm_lut, batch), one_by_one, atol=1e-6)


def test_cube_file_applied_by_colour_science_matches_ours(warm_lut, heldout, tmp_path):
    import colour

    path = write_cube(warm_lut, tmp_path / "warm.cube", title="warm")
    assert path.read_text().count("\n") >= 33**3
    theirs = colour.io.read_LUT(str(path))
    x = heldout[0]
    by_colour = torch.from_numpy(theirs.apply(x.permute(1, 2, 0).double().numpy())).permute(2, 0, 1).float()
    assert (by_colour.clamp(0, 1) - apply_lut(warm_lut, x)).abs().max() <= 1 / 255
    again = read_cube(path)
    assert np.allclose(again.table, warm_lut.table, atol=1e-6)
    assert np.array_equal(again.domain, warm_lut.domain)


def test_cube_bytes_round_trip(warm_lut):
    data = cube_bytes(warm_lut)
    assert b"LUT_3D_SIZE 33" in data
    assert np.allclose(lut_from_cube_bytes(data).table, warm_lut.table, atol=1e-6)


def test_safetensors_round_trip_next_to_other_tensors(warm_lut):
    data = safetensors.torch.save({"context": torch.zeros(2, 4), **lut_tensors(warm_lut)})
    loaded = lut_from_tensors(safetensors.torch.load(data))
    assert np.array_equal(loaded.table, warm_lut.table)
    assert np.array_equal(loaded.domain, warm_lut.domain)
    with pytest.raises(ValueError, match="no LUT"):
        lut_from_tensors({"context": torch.zeros(2, 4)})


def test_lut_refuses_a_malformed_table():
    with pytest.raises(ValueError, match="size, size, size, 3"):
        Lut(torch.zeros(4, 4, 5, 3), identity_lut().domain)
    with pytest.raises(ValueError, match="domain"):
        Lut(torch.zeros(4, 4, 4, 3), torch.tensor([[0.0] * 3, [0.0] * 3]))
