"""Real photographs that ship inside installed wheels: the training and benchmark photos.

No data set can be downloaded here, so the models and benchmarks use the handful of licensed sample
photos that scikit-image, scikit-learn and matplotlib carry in their wheels. The held-out split is
fixed so that every benchmark in the project reports on photos no model was trained on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (python package, path inside that package's install folder)
PHOTO_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "present": ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
}

# Never used for training: a product shot, a close-up of a flower and an animal portrait.
HELDOUT: tuple[str, ...] = ("coffee", "flower", "chelsea")

PHOTO_LICENCES: dict[str, str] = {
    "astronaut": "public domain (NASA)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "rocket": "public domain (SpaceX)",
    "motorcycle_left": "Middlebury 2014 stereo benchmark (Scharstein et al.), as shipped by scikit-image",
    "motorcycle_right": "Middlebury 2014 stereo benchmark (Scharstein et al.), as shipped by scikit-image",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 1.0 (Wikimedia Commons)",
    "ihc": "no known copyright restrictions (scikit-image)",
    "china": "CC-BY 2.0, danielbuechele on Flickr (scikit-learn sample images)",
    "flower": "CC-BY 2.0, vultilion on Flickr (scikit-learn sample images)",
    "grace_hopper": "public domain (US Navy photo, as shipped by matplotlib)",
    "present": "Minduka on Wikimedia Commons, as shipped by matplotlib (check before redistribution)",
}


def photo_path(name: str) -> Path:
    """Locate a sample photo inside its wheel without importing the (slow) package."""
    package, relative = PHOTO_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"photo {name!r} needs the {package!r} package installed")
    return Path(spec.origin).parent / relative


def load_photo(name: str) -> np.ndarray:
    """One photo as HxWx3 uint8; transparency is flattened onto white like a product backdrop."""
    with Image.open(photo_path(name)) as img:
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            img = flat
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def photo_names(split: str = "train") -> list[str]:
    """Names in a split: "train" (everything not held out), "heldout" or "all"."""
    if split == "train":
        return [name for name in PHOTO_FILES if name not in HELDOUT]
    if split == "heldout":
        return list(HELDOUT)
    if split == "all":
        return list(PHOTO_FILES)
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def sample_photos(split: str = "train") -> dict[str, np.ndarray]:
    """The photos of a split by name, each HxWx3 uint8."""
    return {name: load_photo(name) for name in photo_names(split)}
