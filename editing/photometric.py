"""The photometric stage: a 3D LUT fitted from exemplar pairs, applied at any resolution, shared as .cube.

Most catalogue retouching (white balance, exposure, tone curve, saturation, colour grade) is a
function of the pixel's colour alone, after = f(before). A 3D LUT is that function sampled on an
N x N x N lattice and read back by trilinear interpolation; it is what a retoucher exports from
Photoshop or Resolve, and it is recovered almost exactly from a few pairs.

Fitting is one linear least-squares problem. Each pixel's output is the trilinear blend of its 8
lattice neighbours (a sparse row of A), so A T = Y over the pairs' pixels, plus two priors over the
lattice towards a base map B: smoothness of T - B (squared first differences between neighbouring
nodes, i.e. the lattice Laplacian in the normal equations) and a weak pull of every node towards B.
Colours the pairs never show then blend smoothly from their neighbours and settle on B far from any
data. B is by default the grade's global 3x4 colour matrix, fitted by least squares on the same
pixels and shrunk towards the identity by a small ridge (so a flat backdrop or unedited pairs give
the identity); `base="identity"` makes unseen colours decay to "leave the colour alone" instead.
The weights are normalised (mean squared error per pixel, mean squared gradient per lattice edge,
mean squared deviation per node), so the same numbers mean the same thing at every lattice size;
that lets a coarse lattice's solution seed the fine one (9 -> 17 -> 33), which brings 33^3 x 3
unknowns down to a few seconds of conjugate gradients instead of ~25 s for a sparse direct solve.

Measured on this machine (scratch runs, 2026-11-30; 10 exemplar crops of 256 px from training
photos, scored by PSNR against the true edit on other training photos, 13 global grades from
editing/transforms.py and compositions of them; "mean / worst" over the grades):

- Fitting space: on sRGB code values the 17^3 LUT scored 49.4 / 44.6 dB; on linear light (decode,
  LUT, encode) 42.2 / 34.1. A linear-light lattice spends its nodes on the highlights and leaves the
  shadows two nodes wide, and catalogue grades are defined on code values (as in Lightroom and
  Resolve). So the LUT maps sRGB code values to sRGB code values, which is also what a .cube
  applied in Photoshop or ffmpeg's lut3d expects.
- Base map, 33^3, scored on present / retina / rocket: identity 45.9 / 40.7 dB, affine 54.9 /
  43.5. On "present" alone (a saturated blue product pack, colours no exemplar crop shows) the
  identity base left the pack blue under sepia (18.5 dB) and grayscale (19.0); the affine base
  turns it sepia (36.9) and grey (70.1). It lost 0.5-2.5 dB there on brighten and darken, whose
  curves a matrix extrapolates less well than "no change".
- Smoothness / pull, identity base, scored on 4 other training photos: smoothness 1e-5: 46.9 / 40.2,
  1e-4: 48.4 / 42.4, 3e-4: 47.0 / 40.8, 1e-3: 44.2 / 37.6 (pull 1e-4); pull 1e-3: 44.8 / 37.6, 1e-5:
  48.9 / 43.4 (smoothness 1e-4). With the affine base: smoothness 3e-5: 54.7 / 43.8, 1e-4: 54.9 /
  43.5: equal within 0.3 dB, so the values tuned with the identity base stay. The pull's reach is
  about sqrt(smoothness / (3 pull)) of the cube's side, ~0.6 at 1e-4 / 1e-4 (tested: unseen corners
  within 0.04 of identity with the identity base).
  Second differences (a thin-plate prior, 17^3) fitted the linear grades better (grayscale 65 dB)
  but lost 13 dB on contrast, whose clipping kinks it cannot bend around: first differences it is.

Application: Pillow's native `ImageFilter.Color3DLUT` (fixed-point trilinear in C, releases the GIL)
for 8-bit images, torch `grid_sample` for float tensors; the two agree within 1/255 (tested). The
table is a numpy array and torch is imported only for tensors, so a process that only applies LUTs
to photos (a partition run on the LUT route) starts without torch.
On a 3840x2160 photo (2-core machine, quiet) Pillow takes 0.26-0.35 s in one pass and 0.16-0.23 s
(mean 0.186 s over the 13 sample photos) as 8 strips on two threads; `grid_sample` 0.97-1.09 s
on two threads; benchmarks/photometric.py re-measures.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from editing.arrays import float32_array, is_tensor, row_strips, strip_pool

if TYPE_CHECKING:
    import scipy.sparse as sp
    from torch import Tensor

LUT_SIZE = 33
SMOOTHNESS = 1e-4
BASE_PULL = 1e-4
_AFFINE_RIDGE = 1e-3
MAX_PIXELS = 250_000
# Lattices up to this size are solved directly; larger ones by CG seeded from the next coarser one.
_DIRECT_SIZE = 9
_CG_RTOL = 1e-6

PairImage = "Image.Image | Tensor"


@dataclass(frozen=True, eq=False)
class Lut:
    """A 3D colour lookup table: ``table[r, g, b]`` is the output RGB of the input colour at lattice
    node (r, g, b), red on the first axis as in colour-science's LUT3D; ``domain`` is the input range
    per channel, rows (min, max), which the lattice spans evenly. Both are float32 numpy arrays
    (tensors and lists given to the constructor are converted)."""

    table: np.ndarray
    domain: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", float32_array(self.table))
        object.__setattr__(self, "domain", float32_array(self.domain))
        if self.table.ndim != 4 or self.table.shape[-1] != 3 or len(set(self.table.shape[:3])) != 1:
            raise ValueError(f"a LUT table is (size, size, size, 3), got {tuple(self.table.shape)}")
        if self.table.shape[0] < 2:
            raise ValueError("a LUT needs at least 2 nodes per axis")
        if tuple(self.domain.shape) != (2, 3) or not bool((self.domain[1] > self.domain[0]).all()):
            raise ValueError("a LUT domain is (2, 3): a (min, max) row pair with max > min per channel")

    @property
    def size(self) -> int:
        return self.table.shape[0]

    @property
    def unit_domain(self) -> bool:
        return bool(np.array_equal(self.domain, _unit_domain()))


def identity_lut(size: int = LUT_SIZE) -> Lut:
    """The LUT that leaves every colour as it is."""
    return Lut(_identity_nodes(size).reshape(size, size, size, 3), _unit_domain())


def _unit_domain() -> np.ndarray:
    return np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)


def _identity_nodes(size: int) -> np.ndarray:
    """(size^3, 3) node colours, red on the slowest axis (row-major over table[r, g, b])."""
    axis = np.linspace(0.0, 1.0, size)
    r, g, b = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.stack([r, g, b], axis=-1).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------- fit


def _pixels(image: PairImage) -> np.ndarray:
    """(H*W, 3) float64 sRGB code values in [0, 1] from a PIL image or a (3,H,W)/(1,3,H,W) tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    if is_tensor(image):
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image is (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        return image.detach().cpu().float().numpy().transpose(1, 2, 0).reshape(-1, 3).astype(np.float64)
    raise TypeError(f"a pair image is a PIL image or a tensor, got {type(image).__name__}")


def _samples(pairs: Sequence[tuple[PairImage, PairImage]], max_pixels: int, seed: int):
    """Every pair's pixels, or a fixed random subset of them when there are more than `max_pixels`
    in all; each pair keeps its share of the budget in proportion to its size."""
    befores, afters = [], []
    for before, after in pairs:
        x, y = _pixels(before), _pixels(after)
        if x.shape != y.shape:
            raise ValueError(f"a pair's halves differ in size: {x.shape[0]} and {y.shape[0]} pixels")
        befores.append(x)
        afters.append(y)
    total = sum(len(x) for x in befores)
    if total > max_pixels:
        for i, (x, y) in enumerate(zip(befores, afters)):
            keep = max(1, len(x) * max_pixels // total)
            chosen = np.sort(np.random.default_rng([seed, i]).choice(len(x), keep, replace=False))
            befores[i], afters[i] = x[chosen], y[chosen]
    x, y = np.concatenate(befores), np.concatenate(afters)
    finite = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    return np.clip(x[finite], 0.0, 1.0), np.clip(y[finite], 0.0, 1.0)


def _interpolation_matrix(x: np.ndarray, size: int) -> sp.csr_array:
    """(n, size^3): row i holds the 8 trilinear weights of pixel i on its lattice cell."""
    import scipy.sparse as sp  # here, not at the top: applying a LUT to a photo does not need it

    position = x * (size - 1)
    low = np.clip(np.floor(position), 0, size - 2).astype(np.int64)
    frac = position - low
    cols = np.empty((len(x), 8), dtype=np.int64)
    vals = np.empty((len(x), 8))
    corner = 0
    for dr in (0, 1):
        for dg in (0, 1):
            for db in (0, 1):
                cols[:, corner] = (low[:, 0] + dr) * size * size + (low[:, 1] + dg) * size + low[:, 2] + db
                vals[:, corner] = (
                    (frac[:, 0] if dr else 1 - frac[:, 0])
                    * (frac[:, 1] if dg else 1 - frac[:, 1])
                    * (frac[:, 2] if db else 1 - frac[:, 2])
                )
                corner += 1
    indptr = np.arange(0, 8 * len(x) + 1, 8)
    return sp.csr_array((vals.ravel(), cols.ravel(), indptr), shape=(len(x), size**3))


def _smoothness_matrix(size: int) -> sp.csr_matrix:
    """DᵀD over the lattice edges, scaled so that tᵀ(DᵀD)t is the mean squared gradient per edge."""
    import scipy.sparse as sp

    step = sp.diags_array([-1.0, 1.0], offsets=[0, 1], shape=(size - 1, size))
    eye = sp.identity(size)
    axes = [sp.kron(sp.kron(step, eye), eye), sp.kron(sp.kron(eye, step), eye), sp.kron(sp.kron(eye, eye), step)]
    edges = 3 * (size - 1) * size * size
    return sum(d.T @ d for d in axes) * ((size - 1) ** 2 / edges)


def _affine_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The (4, 3) colour matrix [r g b 1] -> rgb fitted by least squares, shrunk towards the identity
    by a small ridge so that directions the pixels do not span (a flat backdrop) stay unchanged."""
    design = np.c_[x, np.ones(len(x))]
    identity = np.r_[np.eye(3), np.zeros((1, 3))]
    ridge = _AFFINE_RIDGE * np.eye(4)
    return identity + np.linalg.solve(design.T @ design / len(x) + ridge,
                                      design.T @ (y - design @ identity) / len(x))


def _solve_level(x, y, size, smoothness, base_pull, base, start):
    """Minimise mean ‖A t - y‖² + smoothness · mean‖D(t - b)/h‖² + base_pull · mean‖t - b‖², with
    b the base map read at the lattice nodes."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    a = _interpolation_matrix(x, size)
    prior = smoothness * _smoothness_matrix(size) + (base_pull / size**3) * sp.identity(size**3)
    nodes = _identity_nodes(size)
    base_nodes = nodes if base is None else np.c_[nodes, np.ones(len(nodes))] @ base
    matrix = ((a.T @ a) / len(x) + prior).tocsr()
    rhs = (a.T @ y) / len(x) + prior @ base_nodes
    if start is None:
        return spsolve(matrix.tocsc(), rhs)
    return _conjugate_gradients(matrix, rhs, start)


def _conjugate_gradients(matrix: sp.csr_array, rhs: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Jacobi-preconditioned CG on the three colour columns at once (one sparse product per step
    for all three, which is where the time goes), each column stopping at _CG_RTOL on its own."""
    inverse_diagonal = (1.0 / matrix.diagonal())[:, None]
    solution = start.copy()
    residual = rhs - matrix @ solution
    goal = _CG_RTOL * np.linalg.norm(rhs, axis=0)
    preconditioned = inverse_diagonal * residual
    direction = preconditioned.copy()
    rho = np.einsum("ij,ij->j", residual, preconditioned)
    for _ in range(10 * len(rhs)):
        active = np.linalg.norm(residual, axis=0) > goal
        if not active.any():
            break
        product = matrix @ direction
        alpha = np.where(active, rho / np.maximum(np.einsum("ij,ij->j", direction, product), 1e-300), 0.0)
        solution += alpha * direction
        residual -= alpha * product
        preconditioned = inverse_diagonal * residual
        rho_next = np.einsum("ij,ij->j", residual, preconditioned)
        direction = preconditioned + np.where(active, rho_next / np.maximum(rho, 1e-300), 0.0) * direction
        rho = rho_next
    return solution


def fit_lut(
    pairs: Sequence[tuple[PairImage, PairImage]],
    size: int = LUT_SIZE,
    *,
    smoothness: float = SMOOTHNESS,
    base: str = "affine",
    base_pull: float = BASE_PULL,
    max_pixels: int = MAX_PIXELS,
    seed: int = 0,
) -> Lut:
    """Fit the LUT that maps every pair's `before` to its `after` (PIL images or [0, 1] tensors,
    sRGB code values); deterministic for the same pairs, settings and seed."""
    # 1. check inputs
    if not pairs:
        raise ValueError("fitting a LUT needs at least one (before, after) pair")
    if size < 2:
        raise ValueError(f"a LUT needs at least 2 nodes per axis, got size={size}")
    if smoothness < 0 or base_pull <= 0:
        raise ValueError("smoothness must be >= 0 and base_pull > 0 (it keeps unseen colours defined)")
    if base not in ("affine", "identity"):
        raise ValueError(f"base must be 'affine' or 'identity', got {base!r}")
    x, y = _samples(pairs, max_pixels, seed)
    if len(x) == 0:
        raise ValueError("the pairs hold no finite pixels")
    base_map = _affine_map(x, y) if base == "affine" else None
    # 2. coarse to fine: each level's solution, read at the next level's nodes, seeds its solver
    levels = [size]
    while levels[-1] > _DIRECT_SIZE:
        levels.append((levels[-1] + 1) // 2)
    nodes = None
    for level in reversed(levels):
        start = None if nodes is None else _lookup(nodes.reshape(-1), _identity_nodes(level))
        nodes = _solve_level(x, y, level, smoothness, base_pull, base_map, start).reshape(level, level, level, 3)
    # 3. outputs are code values: keep the table in [0, 1] so every reader clips alike
    return Lut(np.clip(nodes, 0.0, 1.0), _unit_domain())


def _lookup(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trilinear read of a flat (size^3*3,) float64 table at (n, 3) unit-domain colours."""
    size = round((table.size // 3) ** (1 / 3))
    return _interpolation_matrix(x, size) @ table.reshape(size**3, 3)


# -------------------------------------------------------------------------------------------- apply


def apply_lut(lut: Lut, image: Image.Image | Tensor, *, threads: int = 2) -> Image.Image | Tensor:
    """The LUT applied to every pixel at the image's own resolution, exact trilinear interpolation.

    A PIL image goes through Pillow's native Color3DLUT (8-bit out, split into `threads` horizontal
    strips run in parallel); a float tensor (3,H,W) or (B,3,H,W) through `grid_sample` (float out,
    clipped to [0, 1])."""
    if isinstance(image, Image.Image):
        if not lut.unit_domain:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
            out = _lookup_domain(lut, pixels.reshape(-1, 3)).reshape(pixels.shape)
            return Image.fromarray((out * 255).round().astype(np.uint8))
        return _apply_pillow(lut, image.convert("RGB"), threads)
    if is_tensor(image):
        return _apply_torch(lut, image)
    raise TypeError(f"apply_lut takes a PIL image or a tensor, got {type(image).__name__}")


def _lookup_domain(lut: Lut, colours: np.ndarray) -> np.ndarray:
    """Trilinear read of a LUT with any domain at (n, 3) colours in that domain, clipped to [0, 1]."""
    low, high = lut.domain.astype(np.float64)
    unit = np.clip((colours - low) / (high - low), 0.0, 1.0)
    return np.clip(_lookup(lut.table.astype(np.float64).reshape(-1), unit), 0.0, 1.0)


def _pillow_filter(lut: Lut) -> ImageFilter.Color3DLUT:
    # Pillow's table runs red fastest, then green, then blue: table[r, g, b] seen as [b][g][r].
    flat = lut.table.transpose(2, 1, 0, 3).reshape(-1).tolist()
    return ImageFilter.Color3DLUT(lut.size, flat)


def _apply_pillow(lut: Lut, image: Image.Image, threads: int) -> Image.Image:
    lut_filter = _pillow_filter(lut)
    if threads <= 1 or image.height < 2:
        return image.filter(lut_filter)
    # Several strips per thread, so a thread slowed by another process does not hold up the photo
    # (2 strips on 2 threads: 0.20-0.24 s per 4K photo; 8 strips: 0.14-0.19 s in the same runs).
    bounds = [(0, top, image.width, bottom) for top, bottom in row_strips(image.height, threads)]
    parts = list(strip_pool(threads).map(lambda box: image.crop(box).filter(lut_filter), bounds))
    out = Image.new("RGB", image.size)
    for box, part in zip(bounds, parts):
        out.paste(part, box[:2])
    return out


def _apply_torch(lut: Lut, image: Tensor) -> Tensor:
    import torch
    import torch.nn.functional as F

    batched = image.dim() == 4
    if not batched:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"a tensor image is (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    low, high = torch.tensor(lut.domain).to(image.device, dtype).view(2, 1, 1, 1, 3).unbind(0)
    # grid_sample's grid (x, y, z) indexes the volume's (W, H, D): red goes on W.
    volume = torch.tensor(lut.table).to(image.device, dtype).permute(3, 2, 1, 0)[None].expand(image.shape[0], -1, -1, -1, -1)
    grid = ((image.to(dtype).permute(0, 2, 3, 1)[:, None] - low) / (high - low)).clamp(0, 1) * 2 - 1
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, :, 0]
    out = out.clamp(0, 1)
    return out if batched else out[0]


# -------------------------------------------------------------------------------- storage and .cube


def lut_tensors(lut: Lut, prefix: str = "lut.") -> dict[str, Tensor]:
    """The LUT as named float32 tensors, ready to go into a safetensors file next to other tensors."""
    import torch

    return {f"{prefix}table": torch.from_numpy(lut.table.copy()), f"{prefix}domain": torch.from_numpy(lut.domain.copy())}


def lut_from_tensors(tensors: dict[str, Tensor | np.ndarray], prefix: str = "lut.") -> Lut:
    """The inverse of `lut_tensors`; numpy arrays (safetensors.numpy) are taken too."""
    try:
        return Lut(tensors[f"{prefix}table"], tensors[f"{prefix}domain"])
    except KeyError as missing:
        raise ValueError(f"no LUT under prefix {prefix!r}: {missing} missing") from None


def write_cube(lut: Lut, path: str | Path, title: str = "catalogue-retouch") -> Path:
    """Write the LUT as an Adobe/Resolve .cube file through colour-science."""
    import colour

    colour_lut = colour.LUT3D(table=lut.table.astype(np.float64), name=title, domain=lut.domain.astype(np.float64))
    colour.io.write_LUT(colour_lut, str(path), method="Iridas Cube")
    return Path(path)


def read_cube(path: str | Path) -> Lut:
    """Read a 3D .cube file through colour-science (a file holding a 1D or shaper LUT is refused)."""
    import colour

    colour_lut = colour.io.read_LUT(str(path))
    table = getattr(colour_lut, "table", None)
    if table is None or np.ndim(table) != 4:
        raise ValueError(f"{path} holds a {type(colour_lut).__name__}, not a 3D LUT")
    return Lut(table, colour_lut.domain)


def cube_bytes(lut: Lut, title: str = "catalogue-retouch") -> bytes:
    """The .cube file's bytes, for a store to write next to the instruction artifact."""
    with tempfile.TemporaryDirectory() as folder:
        return write_cube(lut, Path(folder) / "lut.cube", title).read_bytes()


def lut_from_cube_bytes(data: bytes) -> Lut:
    """The inverse of `cube_bytes`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lut.cube"
        path.write_bytes(data)
        return read_cube(path)

