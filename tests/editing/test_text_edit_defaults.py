"""Where a text edit's steps and guidance come from: the caller, else the model folder's edits.json
(`defaults.text_edit`), else the papers; and the entry points run with what the lookup returns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from editing.fpe import fpe_edit
from editing.models import load_model, read_spec, shipped_model_dir
from editing.p2p import ddim_p2p_edit
from editing.siminversion import siminversion_edit
from editing.text_edit import PAPER_DEFAULTS, PAPER_STEPS, TEXT_EDIT_METHODS, regenerate, resolve_text_edit
from tests.tiny_models import build_tiny_t2i

BLOCK = {
    "num_inference_steps": 3,
    "ddim_p2p": {"w_inv": 1.0, "w_src": 2.5, "w_tgt": 2.5},
    "siminversion": {"w_tgt": 1.75},  # w_inv and w_src left to the paper
    "fpe": {"w_src": 1.25, "w_tgt": 1.25},
    "regenerate": {"w_tgt": 2.5},
    "calibration": {"note": "free-form"},
}


def _with_block(folder: Path, block: dict | None) -> Path:
    """The tiny t2i folder with `defaults.text_edit` set to `block` (None: without edits.json)."""
    spec_file = folder / "edits.json"
    if block is None:
        spec_file.unlink()
        return folder
    spec = json.loads(spec_file.read_text())
    spec["defaults"]["text_edit"] = block
    spec_file.write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def declared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_block(build_tiny_t2i(tmp_path_factory.mktemp("models") / "declared"), BLOCK)


@pytest.fixture(scope="module")
def plain_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-format folder as it comes from the hub: no edits.json at all."""
    return _with_block(build_tiny_t2i(tmp_path_factory.mktemp("models") / "plain"), None)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_folder_with_defaults_gives_its_own_values(declared_dir: Path) -> None:
    spec = load_model(declared_dir, kind="t2i").spec
    sim = resolve_text_edit("siminversion", spec)
    assert sim.values == {"num_inference_steps": 3, "w_inv": 0.5, "w_src": 0.5, "w_tgt": 1.75}
    assert sim.origin == {
        "num_inference_steps": "model",
        "w_inv": "paper",
        "w_src": "paper",
        "w_tgt": "model",
    }
    fpe = resolve_text_edit("fpe", spec)
    assert fpe.values == {"num_inference_steps": 3, "w_src": 1.25, "w_tgt": 1.25}
    assert set(fpe.origin.values()) == {"model"}
    assert resolve_text_edit("ddim_p2p", spec).values["w_src"] == 2.5


def test_a_folder_without_edits_json_gets_the_papers_values(plain_sd_dir: Path) -> None:
    loaded = load_model(plain_sd_dir, kind="t2i")
    assert loaded.spec is None
    expected = {
        "ddim_p2p": {"w_inv": 1.0, "w_src": 7.5, "w_tgt": 7.5},
        "siminversion": {"w_inv": 0.5, "w_src": 0.5, "w_tgt": 7.5},
        "fpe": {"w_src": 7.5, "w_tgt": 7.5},
    }
    for method, scales in expected.items():
        settings = resolve_text_edit(method, loaded.spec)
        assert settings.values == {"num_inference_steps": 50, **scales}
        assert set(settings.origin.values()) == {"paper"}
    # an edits.json without a text_edit block (the tiny test models, an older folder) is the same
    assert resolve_text_edit("siminversion", {"model": "m", "defaults": {"guidance_scale": 3.0}}).values == {
        "num_inference_steps": PAPER_STEPS,
        **PAPER_DEFAULTS["siminversion"],
    }


def test_the_caller_wins_over_the_folder(declared_dir: Path) -> None:
    spec = read_spec(declared_dir)
    settings = resolve_text_edit("siminversion", spec, w_tgt=4.0, num_inference_steps=7, w_src=None)
    assert settings.values == {"num_inference_steps": 7, "w_inv": 0.5, "w_src": 0.5, "w_tgt": 4.0}
    assert settings.origin["w_tgt"] == "caller" and settings.origin["num_inference_steps"] == "caller"
    assert settings.origin["w_src"] == "paper"  # None means "not given"
    assert settings.record()["defaults_origin"]["w_tgt"] == "caller"


def test_the_shipped_t2i_declares_calibrated_defaults_for_every_method() -> None:
    spec = read_spec(shipped_model_dir("t2i"))
    block = spec["defaults"]["text_edit"]
    assert "training" in json.dumps(block["calibration"])  # says which photos it was measured on
    for method in TEXT_EDIT_METHODS:
        settings = resolve_text_edit(method, spec)
        assert settings.origin["w_tgt"] == "model"
        assert settings.values["w_tgt"] < PAPER_DEFAULTS[method]["w_tgt"]  # not SD's 7.5


def test_malformed_blocks_and_foreign_scales_are_refused() -> None:
    with pytest.raises(ValueError, match="fpe has no w_inv"):
        resolve_text_edit("fpe", None, w_inv=0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_text_edit("ddim-p2p")
    with pytest.raises(ValueError, match="w_tgt must be >= 0"):
        resolve_text_edit("fpe", None, w_tgt=-1.0)
    bad = [
        {"fpe": {"w_inv": 0.5}},  # FPE has no inversion scale
        {"siminversion": {"w_tgt": "7.5"}},
        {"num_inference_steps": 0},
        {"sim_inversion": {"w_tgt": 2.0}},  # a typo must not silently fall back to the paper
    ]
    for block in bad:
        with pytest.raises(ValueError, match="defaults.text_edit"):
            resolve_text_edit("siminversion", {"model": "m", "defaults": {"text_edit": block}})


@pytest.mark.parametrize(
    ("edit", "method", "kwargs"),
    [
        (siminversion_edit, "siminversion", {"source_prompt": "a photo"}),
        (ddim_p2p_edit, "ddim_p2p", {"source_prompt": "a photo"}),
        (fpe_edit, "fpe", {}),
        (regenerate, "regenerate", {"source_prompt": "a photo"}),
    ],
)
def test_entry_points_run_with_the_folders_defaults_unless_overridden(
    declared_dir: Path, image: torch.Tensor, edit, method: str, kwargs: dict
) -> None:
    torch.set_num_threads(1)
    loaded = load_model(declared_dir, kind="t2i")
    expected = resolve_text_edit(method, loaded.spec).values
    args = {"image": image, "target_prompt": "a sepia photo", **kwargs}
    by_model = edit(loaded, generator=torch.Generator().manual_seed(0), **args)
    assert {k: by_model.params[k] for k in expected} == expected
    assert by_model.params["defaults_origin"]["w_tgt"] == "model"
    assert len(by_model.inversion.trajectory) == BLOCK["num_inference_steps"] + 1  # the steps were used
    # a bare pipeline loaded from the folder finds the same defaults
    bare = StableDiffusionPipeline.from_pretrained(declared_dir, safety_checker=None)
    by_pipe = edit(bare, generator=torch.Generator().manual_seed(0), **args)
    torch.testing.assert_close(by_pipe.images, by_model.images, rtol=0, atol=0)
    # the same values given explicitly give the same edit; another target scale another one
    explicit = edit(loaded.pipe, generator=torch.Generator().manual_seed(0), **args, **expected)
    torch.testing.assert_close(explicit.images, by_model.images, rtol=0, atol=0)
    override = edit(loaded, generator=torch.Generator().manual_seed(0), **args, w_tgt=6.0)
    assert override.params["w_tgt"] == 6.0 and override.params["defaults_origin"]["w_tgt"] == "caller"
    assert not torch.allclose(override.images, by_model.images)
