"""The shipped default models: stock pipelines load them offline, their spec matches the transforms,
their content hash is what the manifest can trust, and the evaluation prints every figure."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from editing.carry import CARRY_MODES
from editing.models import DTYPES, DTypeName, folder_sha256, load_model, shipped_model_dir
from editing.photos import HELDOUT, sample_photos
from editing.transforms import EDITS, resolve_transform

KINDS = ("ip2p", "t2i")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: HF offline mode and every socket connect raising."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline load")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _photo(size: int = 64) -> Image.Image:
    photo = sample_photos("heldout")["coffee"]
    return Image.fromarray(photo).resize((size, size))


def test_heldout_photos_never_train() -> None:
    train, heldout = sample_photos("train"), sample_photos("heldout")
    assert set(heldout) == set(HELDOUT) and len(heldout) >= 3
    assert not set(train) & set(heldout)
    assert all(
        p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in [*train.values(), *heldout.values()]
    )


def test_transforms_keep_shape_range_and_do_what_they_say() -> None:
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    for edit_id, edit in EDITS.items():
        y = edit.function(x)
        assert y.shape == x.shape and y.dtype == x.dtype, edit_id
        assert float(y.min()) >= 0 and float(y.max()) <= 1, edit_id
    grey = EDITS["grayscale"].function(x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    warm = EDITS["warm"].function(x)
    assert (warm[:, 0].mean() - warm[:, 2].mean()) > (x[:, 0].mean() - x[:, 2].mean()) + 0.05
    assert EDITS["blur"].function(x).std() < 0.6 * x.std()
    ones = torch.ones(1, 3, 33, 33)
    vignetted = EDITS["vignette"].function(ones)
    assert float(vignetted[0, 0, 16, 16]) == pytest.approx(1.0) and float(vignetted[0, 0, 0, 0]) < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_edits_json_has_the_agreed_shape(kind: str) -> None:
    folder = shipped_model_dir(kind)
    spec = json.loads((folder / "edits.json").read_text())
    expected_keys = {"model", "resolution", "defaults", "edits"} | (
        {"base_caption"} if kind == "t2i" else set()
    )
    assert set(spec) == expected_keys
    assert spec["model"] == folder.name and spec["resolution"] == 64
    # the t2i also declares its text-edit guidance (editing.text_edit.resolve_text_edit)
    assert set(spec["defaults"]) == {"num_inference_steps", "guidance_scale", "image_guidance_scale"} | (
        {"text_edit"} if kind == "t2i" else set()
    )
    assert len(spec["edits"]) >= 10
    assert [e["id"] for e in spec["edits"]] == list(EDITS)
    x = torch.rand(1, 3, 16, 16)
    for edit in spec["edits"]:
        text_key = "phrasings" if kind == "ip2p" else "caption"
        # the t2i also says how each caption's edit is carried to full size (editing.carry)
        assert set(edit) == {"id", text_key, "transform"} | ({"carry"} if kind == "t2i" else set())
        if kind == "t2i":
            assert edit["carry"] in CARRY_MODES
        if kind == "ip2p":
            assert len(edit["phrasings"]) >= 2
        assert resolve_transform(edit["transform"])(x).shape == x.shape
    if kind == "t2i":
        assert spec["base_caption"] == "a photo"


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_folder_fits_the_size_budget(kind: str) -> None:
    folder = shipped_model_dir(kind)
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20_000_000
    assert (folder / "README.md").is_file()


def test_stock_ip2p_pipeline_loads_offline_and_edits(offline: None) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(shipped_model_dir("ip2p"))
    pipe.set_progress_bar_config(disable=True)
    source = _photo()
    out = pipe(
        "make it black and white",
        image=source,
        num_inference_steps=10,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (64, 64)
    edited, original = np.asarray(out, dtype=np.float32), np.asarray(source, dtype=np.float32)
    # the instruction was followed: red and blue (nearly) agree in the output, unlike in the source
    colour_gap = np.abs(edited[..., 0] - edited[..., 2]).mean()
    assert colour_gap < 0.3 * np.abs(original[..., 0] - original[..., 2]).mean()


def test_stock_t2i_pipeline_loads_offline_and_generates(offline: None) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shipped_model_dir("t2i"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo", height=64, width=64, num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    )
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 5


def test_load_model_reports_what_the_manifest_records(offline: None) -> None:
    model = load_model(kind="ip2p")
    assert model.model_id == "retouch-tiny-ip2p" and model.kind == "ip2p"
    assert model.sha256 == folder_sha256(shipped_model_dir("ip2p")) and len(model.sha256) == 64
    assert model.spec is not None and model.spec["model"] == "retouch-tiny-ip2p"
    assert model.pipe.unet.dtype == torch.float32


def test_shipped_ip2p_in_bfloat16_edits_like_float32(offline: None) -> None:
    """The fast application dtype: same instruction, seeds and photos; the bfloat16 outputs stay
    within 45 dB PSNR of the float32 ones (measured about 55 dB on held-out photos at 20 steps)."""
    from editing.instruct import ApplyConfig, apply_instruction, phrase_instruction

    photos = [_photo(64), _photo(96)]
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(kind="ip2p", dtype=dtype)
        assert model.dtype == dtype and model.pipe.vae.dtype == model.pipe.unet.dtype
        instruction = phrase_instruction(model, "make it warmer", "warm")
        outputs[dtype] = apply_instruction(model, instruction, photos, ApplyConfig(dtype=dtype), seeds=[1, 2])
    for full, half in zip(outputs["float32"], outputs["bfloat16"], strict=True):
        a, b = np.asarray(full, dtype=np.float64), np.asarray(half, dtype=np.float64)
        psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))
        assert psnr >= 45, psnr


def test_load_model_takes_a_dtype_by_name() -> None:
    assert set(get_args(DTypeName)) == set(DTYPES)  # the config choices are the loadable dtypes
    assert load_model(kind="ip2p", dtype=torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"):
        load_model(kind="ip2p", dtype="int8")


def test_load_model_refuses_wrong_kind_and_remote_uris() -> None:
    with pytest.raises(ValueError, match="input channels"):
        load_model(shipped_model_dir("t2i"), kind="ip2p")
    with pytest.raises(ValueError, match="materialise_model"):
        load_model("s3://bucket/models/ip2p")
    with pytest.raises(ValueError, match="kind"):
        load_model(kind="inpaint")


def test_sha256_is_stable_and_follows_content(tmp_path: Path) -> None:
    original = shipped_model_dir("ip2p")
    copy = tmp_path / "renamed-copy"
    shutil.copytree(original, copy)
    assert folder_sha256(copy) == folder_sha256(original)
    (copy / "README.md").write_text("a corrected model card")
    assert folder_sha256(copy) == folder_sha256(original), "the model card is documentation, not behaviour"
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert folder_sha256(copy) != folder_sha256(original)


def test_eval_model_refuses_zero_steps_before_loading_anything() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["eval-model", str(shipped_model_dir("t2i")), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_eval_model_ends_with_one_json_line(kind: str) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    # 10 steps: the card's 50 cost two minutes here and check nothing more about the output's form.
    args = ["eval-model", str(shipped_model_dir(kind)), "--max-photos", "1", "--steps", "10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["n_images"] == 5 and figures["kind"] == kind and figures["steps"] == 10
    card = json.loads((shipped_model_dir(kind) / "edits.json").read_text())
    assert figures["settings"] == card["defaults"], "the settings must be quoted as the card has them"
    assert set(figures["psnr_identity"]) == set(EDITS)
    assert figures["psnr_vae_recon"] > 20
    if kind == "ip2p":
        assert set(figures["psnr_edit"]) == set(EDITS) and "psnr_edit_mean" in figures
    else:
        assert figures["psnr_inversion_recon"] > 15 and set(figures["psnr_caption_edit"]) == set(EDITS)
