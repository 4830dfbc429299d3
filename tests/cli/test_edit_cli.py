"""`retouch edit` end to end on a local folder with the tiny random t2i model: one PNG per good
photo at its own size and stem, the corrupt file skipped and reported, a final JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from tests.tiny_models import build_tiny_t2i


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t2i(tmp_path_factory.mktemp("models") / "tiny-t2i")


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _run(args: list[str]) -> tuple[int, str, dict]:
    result = CliRunner().invoke(app, args)
    summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else {}
    return result.exit_code, result.output, summary


@pytest.mark.parametrize("method", ["fpe", "siminversion", "ddim-p2p"])
def test_edit_writes_one_png_per_photo_and_reports_the_corrupt_one(
    tmp_path: Path, tiny_model: Path, method: str
) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    _photo(0, (48, 36)).save(photos / "shirt.jpg")
    _photo(1, (32, 32)).save(photos / "shoe.png")
    (photos / "broken.png").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("ignored")
    args = [
        "edit",
        str(photos),
        "--source-prompt",
        "a photo",
        "--target-prompt",
        "a sepia photo",
        "--method",
        method,
        "--output",
        str(out),
        "--model",
        str(tiny_model),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "3",
    ]
    code, output, summary = _run(args)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["shirt.png", "shoe.png"]
    with Image.open(out / "shirt.png") as img:
        assert img.size == (48, 36)
    assert summary["command"] == "edit" and summary["method"] == method
    assert summary["written"] == 2 and summary["failed"] == 1
    assert summary["failures"][0]["key"] == "broken.png"
    assert summary["params"]["seed"] == 3 and summary["params"]["num_inference_steps"] == 2
    # each method's own default inversion: one fixed-point iteration for SimInversion, two otherwise
    assert summary["params"]["inversion_iterations"] == (1 if method == "siminversion" else 2)
    assert "2/3" in output or "3/3" in output


def test_edit_is_reproducible_for_a_seed(tmp_path: Path, tiny_model: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(0, (40, 40)).save(photos / "a.png")
    outputs = []
    for run in ("one", "two"):
        code, output, _ = _run(
            [
                "edit",
                str(photos),
                "--target-prompt",
                "a sepia photo",
                "--output",
                str(tmp_path / run),
                "--model",
                str(tiny_model),
                "--steps",
                "2",
                "--seed",
                "5",
            ]
        )
        assert code == 0, output
        outputs.append(np.asarray(Image.open(tmp_path / run / "a.png")))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_edit_refuses_an_inversion_scale_for_fpe(tmp_path: Path, tiny_model: Path) -> None:
    code, output, _ = _run(
        [
            "edit",
            str(tmp_path),
            "--target-prompt",
            "x",
            "--output",
            str(tmp_path / "o"),
            "--model",
            str(tiny_model),
            "--method",
            "fpe",
            "--w-inv",
            "0.5",
        ]
    )
    assert code != 0 and "--w-inv" in output


@pytest.fixture(scope="module")
def declared_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny t2i with its own text-edit defaults in edits.json."""
    folder = build_tiny_t2i(tmp_path_factory.mktemp("models") / "declared-t2i")
    spec = json.loads((folder / "edits.json").read_text())
    spec["defaults"]["text_edit"] = {"num_inference_steps": 2, "siminversion": {"w_tgt": 1.75}}
    (folder / "edits.json").write_text(json.dumps(spec))
    return folder


def test_edit_summary_records_the_guidance_it_used_and_where_it_came_from(
    tmp_path: Path, tiny_model: Path, declared_model: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(0, (40, 40)).save(photos / "a.png")

    def edit(model: Path, run: str, *flags: str) -> tuple[dict, np.ndarray]:
        code, output, summary = _run(
            [
                "edit",
                str(photos),
                "--source-prompt",
                "a photo",
                "--target-prompt",
                "a sepia photo",
                "--method",
                "siminversion",
                "--output",
                str(tmp_path / run),
                "--model",
                str(model),
                *flags,
            ]
        )
        assert code == 0, output
        return summary["params"], np.asarray(Image.open(tmp_path / run / "a.png"))

    # the folder's defaults: w_tgt and steps from edits.json, the rest from the paper
    params, declared = edit(declared_model, "declared")
    assert (params["num_inference_steps"], params["w_inv"], params["w_src"], params["w_tgt"]) == (
        2,
        0.5,
        0.5,
        1.75,
    )
    assert params["defaults_origin"] == {
        "num_inference_steps": "model",
        "w_inv": "paper",
        "w_src": "paper",
        "w_tgt": "model",
    }
    # the recorded values are the ones used: given explicitly to a folder without them, same output
    params, explicit = edit(
        tiny_model, "explicit", "--steps", "2", "--w-inv", "0.5", "--w-src", "0.5", "--w-tgt", "1.75"
    )
    assert set(params["defaults_origin"].values()) == {"caller"}
    np.testing.assert_array_equal(explicit, declared)
    # the caller wins over the folder
    params, overridden = edit(declared_model, "override", "--w-tgt", "5")
    assert params["w_tgt"] == 5.0 and params["defaults_origin"]["w_tgt"] == "caller"
    assert params["num_inference_steps"] == 2
    assert not np.array_equal(overridden, declared)
    # a folder without text-edit defaults gets the paper's target guidance
    params, _ = edit(tiny_model, "paper", "--steps", "2")
    assert params["w_tgt"] == 7.5 and params["defaults_origin"]["w_tgt"] == "paper"


def test_edit_carries_by_the_models_choice_per_caption_unless_told(tmp_path: Path, tiny_model: Path) -> None:
    """The model folder may say per caption how the native edit reaches the photo (`carry`); the
    summary names the mode, where it came from, and per output how much the colour carry kept."""
    folder = build_tiny_t2i(tmp_path / "carry-t2i")
    spec = json.loads((folder / "edits.json").read_text())
    spec["edits"] = [{"id": "warm", "caption": "a warm photo", "carry": "colour"}]
    spec["defaults"]["text_edit"] = {"num_inference_steps": 2}
    (folder / "edits.json").write_text(json.dumps(spec))
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(3, (72, 40)).save(photos / "a.png")

    def edit(run: str, caption: str, *flags: str) -> tuple[dict, np.ndarray]:
        code, output, summary = _run(
            ["edit", str(photos), "--source-prompt", "a photo", "--target-prompt", caption,
             "--method", "ddim-p2p", "--output", str(tmp_path / run), "--model", str(folder), *flags]
        )
        assert code == 0, output
        return summary, np.asarray(Image.open(tmp_path / run / "a.png"))

    summary, colour = edit("caption", "a warm photo")
    assert (summary["params"]["carry"], summary["params"]["carry_origin"]) == ("colour", "model caption")
    assert 0.0 < summary["carried"]["a.png"]["colour_explains"] <= 1.0
    assert colour.shape == (40, 72, 3)
    summary, lift = edit("caller", "a warm photo", "--carry", "lift")
    assert (summary["params"]["carry"], summary["params"]["carry_origin"]) == ("lift", "caller")
    assert summary["carried"]["a.png"]["carry"] == "lift" and summary["carried"]["a.png"]["colour_explains"] is None
    skin = summary["carried"]["a.png"]["skin_outliers"]  # a random-noise photo: few or no skin tones
    assert skin is None or 0.0 <= skin <= 1.0
    assert summary["skin_flagged"] == ([] if skin is None or skin <= 0.25 else ["a.png"])
    assert not np.array_equal(colour, lift)
    summary, _ = edit("unlisted", "a golden photo")
    assert (summary["params"]["carry"], summary["params"]["carry_origin"]) == ("lift", "default")


def test_edit_reports_outputs_that_push_skin_tones_out_of_range(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the model does, an output with red faces is named on stderr and in the summary."""
    import editing.carry
    from editing.photos import load_photo

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(load_photo("grace_hopper")).resize((96, 112)).save(photos / "portrait.png")
    real = editing.carry.carry_edit

    def reddened(full, source_small, edited_small, mode):
        carried = real(full, source_small, edited_small, mode)
        luma = full.mean(0, keepdim=True)
        red = (luma + 2.5 * (full - luma)).clamp(0, 1)  # what a 2.5x saturation does to a face
        return editing.carry.CarriedEdit(red, carried.mode, carried.colour_explains)

    monkeypatch.setattr(editing.carry, "carry_edit", reddened)
    result = CliRunner().invoke(app, [
        "edit", str(photos), "--source-prompt", "a photo", "--target-prompt", "a vivid photo",
        "--method", "ddim-p2p", "--steps", "2", "--output", str(tmp_path / "out"), "--model", str(tiny_model),
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["skin_flagged"] == ["portrait.png"]
    assert summary["carried"]["portrait.png"]["skin_outliers"] > 0.25
    assert "flagged portrait.png: skin tones out of range" in result.stderr
    assert (tmp_path / "out" / "portrait.png").exists()  # reported, still written
