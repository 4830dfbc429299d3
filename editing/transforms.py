"""Ground-truth global edits: the functions the tiny models are trained to imitate.

Every edit is a plain, deterministic function of the source photo, float tensor (B, 3, H, W) in
[0, 1] in and out, so a benchmark can compute the exact target of "make it warmer" for any photo.
Spatial edits (blur, vignette) scale with the image size, so the same edit means the same thing
at 64 px and at full resolution. `vibrance` and `crisp` are retoucher presets for the demo's house
styles; they are not in `EDITS`, so no model is trained on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)


def _luma(x: Tensor) -> Tensor:
    weights = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _gains(x: Tensor, red: float, green: float, blue: float) -> Tensor:
    return (x * x.new_tensor((red, green, blue)).view(1, 3, 1, 1)).clamp(0, 1)


def warm(x: Tensor) -> Tensor:
    """Shift the white balance towards orange, as a lower colour temperature does."""
    return _gains(x, 1.12, 1.0, 0.82)


def cool(x: Tensor) -> Tensor:
    """Shift the white balance towards blue."""
    return _gains(x, 0.84, 0.98, 1.15)


def saturate(x: Tensor) -> Tensor:
    """Double the distance of every pixel from its grey value."""
    luma = _luma(x)
    return (luma + 2.0 * (x - luma)).clamp(0, 1)


def desaturate(x: Tensor) -> Tensor:
    """Keep 35% of the colour: muted, not grey."""
    luma = _luma(x)
    return (luma + 0.35 * (x - luma)).clamp(0, 1)


def grayscale(x: Tensor) -> Tensor:
    """Rec. 601 luma on all three channels."""
    return _luma(x).expand_as(x).clone()


def sepia(x: Tensor) -> Tensor:
    """The classic sepia-toning matrix."""
    matrix = x.new_tensor(((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131)))
    return torch.einsum("oc,bchw->bohw", matrix, x).clamp(0, 1)


def brighten(x: Tensor) -> Tensor:
    """Gamma 0.6: lifts the mid-tones and shadows, keeps white white."""
    return x.clamp(0, 1).pow(0.6)


def darken(x: Tensor) -> Tensor:
    """Gamma 1.7: deepens the mid-tones, keeps black black."""
    return x.clamp(0, 1).pow(1.7)


def increase_contrast(x: Tensor) -> Tensor:
    """Stretch 1.6x around mid-grey."""
    return ((x - 0.5) * 1.6 + 0.5).clamp(0, 1)


def decrease_contrast(x: Tensor) -> Tensor:
    """Compress to 55% around mid-grey: a flat, faded look."""
    return (x - 0.5) * 0.55 + 0.5


def blur(x: Tensor, fraction: float = 0.035) -> Tensor:
    """Gaussian blur with sigma `fraction` of the shorter side (3.5%: 2.2 px at 64 px)."""
    if fraction <= 0:
        return x
    sigma = fraction * min(x.shape[-2:])
    radius = min(max(1, int(3 * sigma + 0.5)), min(x.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def vignette(x: Tensor) -> Tensor:
    """Darken towards the corners: 1 - 0.7 r^2, r = 1 at the corners."""
    height, width = x.shape[-2:]
    ys = torch.linspace(-1, 1, height, dtype=x.dtype, device=x.device).view(-1, 1)
    xs = torch.linspace(-1, 1, width, dtype=x.dtype, device=x.device).view(1, -1)
    radius_sq = (xs**2 + ys**2) / 2
    return x * (1 - 0.7 * radius_sq)


def vibrance(x: Tensor, amount: float = 0.8) -> Tensor:
    """A retoucher's vibrance: muted colours gain up to 1 + `amount` x their colour, vivid ones
    little, and skin hues (red > green > blue, green about halfway) a third as much, so faces stay
    faces where a plain saturation boost turns them red. Continuous in colour, so a LUT fits it."""
    luma = _luma(x)
    red, green, blue = x.unbind(1)
    spread = (x.amax(1) - x.amin(1)).unsqueeze(1)
    position = (green - blue) / (red - blue).clamp_min(1e-6)
    skin = ((red > green) & (green > blue)).to(x.dtype) * (1 - (position - 0.45).abs() / 0.45).clamp(0, 1)
    gain = 1 + amount * (1 - spread).pow(2) * (1 - 2 / 3 * skin.unsqueeze(1))
    return (luma + gain * (x - luma)).clamp(0, 1)


def crisp(x: Tensor) -> Tensor:
    """A product-shot preset: 1.25x contrast around mid-grey, then vibrance."""
    return vibrance(((x - 0.5) * 1.25 + 0.5).clamp(0, 1))


class Edit(NamedTuple):
    """One edit: its ground-truth function, instruction phrasings (ip2p) and style caption (t2i)."""

    function: Callable[[Tensor], Tensor]
    phrasings: list[str]
    caption: str


EDITS: dict[str, Edit] = {
    "warm": Edit(warm, ["make it warmer", "add a warm tone", "warm up the colors"], "a warm photo"),
    "cool": Edit(cool, ["make it cooler", "add a cool blue tone", "cool down the colors"], "a cool photo"),
    "saturate": Edit(
        saturate,
        ["make the colors more vivid", "increase the saturation", "boost the colors"],
        "a vivid photo",
    ),
    "desaturate": Edit(
        desaturate,
        ["mute the colors", "reduce the saturation", "make the colors more subtle"],
        "a muted photo",
    ),
    "grayscale": Edit(
        grayscale,
        ["make it black and white", "convert to grayscale", "remove all color"],
        "a black and white photo",
    ),
    "sepia": Edit(
        sepia, ["make it sepia", "give it a sepia tone", "make it look like an old photo"], "a sepia photo"
    ),
    "brighten": Edit(
        brighten, ["make it brighter", "brighten the image", "lift the shadows"], "a bright photo"
    ),
    "darken": Edit(darken, ["make it darker", "darken the image", "lower the exposure"], "a dark photo"),
    "increase_contrast": Edit(
        increase_contrast,
        ["increase the contrast", "add more contrast", "make it punchier"],
        "a high contrast photo",
    ),
    "decrease_contrast": Edit(
        decrease_contrast,
        ["reduce the contrast", "make it look faded", "flatten the contrast"],
        "a low contrast photo",
    ),
    "blur": Edit(blur, ["blur the image", "make it blurry", "soften the focus"], "a blurry photo"),
    "vignette": Edit(
        vignette, ["add a vignette", "darken the corners", "add a dark vignette"], "a photo with a vignette"
    ),
}


def transform_ref(edit_id: str) -> str:
    """The importable "module:function" name of an edit, as written into edits.json."""
    function = EDITS[edit_id].function
    return f"{function.__module__}:{function.__name__}"


def resolve_transform(ref: str) -> Callable[[Tensor], Tensor]:
    """Import a "module:function" reference from edits.json."""
    import importlib

    module_name, _, function_name = ref.partition(":")
    return getattr(importlib.import_module(module_name), function_name)
