"""`retouch learn` + `retouch apply` end to end on a local folder with the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from tests.tiny_models import build_tiny_ip2p


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p")


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_learn_then_apply_skips_the_corrupt_photo_and_writes_the_rest(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "root"
    for i in range(3):
        folder = root / "exemplars" / "warm" / f"p{i}"
        folder.mkdir(parents=True)
        before = _photo(i, (40, 32))
        before.save(folder / "before.png")
        _warm(before).save(folder / "after.jpg")
    (root / "exemplars" / "warm" / "p9").mkdir()
    (root / "exemplars" / "warm" / "p9" / "before.png").write_bytes(b"")  # missing after: a problem
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(10, (50, 30)).save(photos / "a.png")
    _photo(11, (36, 36)).save(photos / "b.jpg")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    runner = CliRunner()

    learned = runner.invoke(app, [
        "learn", str(root), "--category", "warm", "--output", str(tmp_path / "instr"), "--steps", "2",
        "--init-instruction", "make it warmer", "--model", str(tiny_model), "--route", "instructbrush",
    ])
    assert learned.exit_code == 0, learned.output
    summary = _last_json(learned.stdout)
    assert summary["command"] == "learn" and summary["pairs"] == 3 and summary["failed"] == 1
    assert summary["route"] == "instructbrush" and summary["route_requested"] == "instructbrush"
    artifact = tmp_path / "instr" / "warm.safetensors"
    assert artifact.exists() and (tmp_path / "instr" / "warm.json").exists()

    out = tmp_path / "out"
    applied = runner.invoke(app, ["apply", str(artifact), str(photos), "--output", str(out), "--model", str(tiny_model)])
    assert applied.exit_code == 0, applied.output
    summary = _last_json(applied.stdout)
    assert summary["written"] == 2 and summary["failed"] == 1
    assert summary["failures"][0]["key"] == "broken.png"
    assert summary["instruction_sha256"] == json.loads((tmp_path / "instr" / "warm.json").read_text())["content_sha256"]
    assert Image.open(out / "a.png").size == (50, 30)
    assert Image.open(out / "b.png").size == (36, 36)
    assert summary["dtype"] == "float32"

    fast = tmp_path / "out-bf16"
    applied = runner.invoke(app, [
        "apply", str(artifact), str(photos), "--output", str(fast), "--model", str(tiny_model), "--dtype", "bfloat16",
    ])
    assert applied.exit_code == 0, applied.output
    summary = _last_json(applied.stdout)
    assert summary["dtype"] == "bfloat16" and summary["written"] == 2 and summary["failed"] == 1
    a, b = (np.asarray(Image.open(folder / "a.png"), dtype=float) for folder in (out, fast))
    assert a.shape == b.shape and np.abs(a - b).mean() < 2  # the same edit, in bfloat16


def test_apply_refuses_an_instruction_learned_on_another_model(tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "root" / "exemplars" / "warm" / "p0"
    root.mkdir(parents=True)
    _photo(0, (32, 32)).save(root / "before.png")
    _photo(1, (32, 32)).save(root / "after.png")
    runner = CliRunner()
    learned = runner.invoke(app, [
        "learn", str(tmp_path / "root"), "--category", "warm", "--output", str(tmp_path / "w.safetensors"),
        "--steps", "1", "--init-instruction", "warm", "--model", str(tiny_model), "--route", "instructbrush",
    ])
    assert learned.exit_code == 0, learned.output
    other = build_tiny_ip2p(tmp_path / "other-ip2p", seed=1)
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(2, (32, 32)).save(photos / "x.png")
    applied = runner.invoke(app, [
        "apply", str(tmp_path / "w.safetensors"), str(photos), "--output", str(tmp_path / "out"),
        "--model", str(other),
    ])
    assert applied.exit_code == 2
    assert "was learned on model" in applied.output
    assert not (tmp_path / "out" / "x.png").exists()


def test_learn_records_the_pair_hashes_the_refresh_ingest_records(tmp_path: Path, tiny_model: Path) -> None:
    """The CLI and the flow hash a pair the same way (decoded pixels), so an instruction's
    pairs[].sha256 does not depend on the command that learned it; re-encoding keeps the hash."""
    from tasks.ingest import validate_exemplars

    root = tmp_path / "root"
    for i in range(2):
        folder = root / "exemplars" / "warm" / f"p{i}"
        folder.mkdir(parents=True)
        _photo(20 + i, (40, 32)).save(folder / "before.png", compress_level=9)
        _photo(30 + i, (40, 32)).save(folder / "after.jpg", quality=90)

    def learned_hashes(output: Path) -> dict[str, str]:
        result = CliRunner().invoke(app, [
            "learn", str(root), "--category", "warm", "--output", str(output), "--steps", "0",
            "--init-instruction", "make it warmer", "--model", str(tiny_model),
        ])
        assert result.exit_code == 0, result.output
        metadata = json.loads(output.with_suffix(".json").read_text())
        return {pair["pair_id"]: pair["sha256"] for pair in metadata["pairs"]}

    by_cli = learned_hashes(tmp_path / "first.safetensors")
    by_flow = {pair["pair_id"]: pair["sha256"] for pair in validate_exemplars.fn(str(root), "warm")["pairs"]}
    assert by_cli == by_flow and len(by_cli) == 2

    before = root / "exemplars" / "warm" / "p0" / "before.png"
    Image.open(before).save(before, compress_level=0)  # same pixels, other bytes
    assert learned_hashes(tmp_path / "second.safetensors") == by_cli


def _warm(image: Image.Image) -> Image.Image:
    x = np.asarray(image, dtype=float)
    return Image.fromarray((x * np.array([1.1, 1.0, 0.8])).clip(0, 255).astype(np.uint8))


def test_a_lut_route_learns_a_cube_applies_without_the_model_and_qc_grades_it(tmp_path: Path) -> None:
    """`learn --route lut` writes the .cube next to the artifact; `apply` of a LUT-only instruction needs
    no model (a model path that does not exist is never opened); `qc` passes the true edit, fails a
    red cast, one JSON line each, exit 0; a bad argument is one line and exit 2."""
    import colour

    from editing.photometric import read_cube

    root = tmp_path / "root"
    for i in range(4):
        folder = root / "exemplars" / "warm" / f"p{i}"
        folder.mkdir(parents=True)
        before = _photo(i, (40, 32))
        before.save(folder / "before.png")
        _warm(before).save(folder / "after.png")
    runner = CliRunner()
    learned = runner.invoke(app, ["learn", str(root), "--category", "warm", "--output", str(tmp_path / "instr"),
                                  "--route", "lut", "--lut-size", "9", "--model", "no-such-model-folder"])
    assert learned.exit_code != 0  # learning loads the model, and there is none at that path
    learned = runner.invoke(app, ["learn", str(root), "--category", "warm", "--output", str(tmp_path / "instr"),
                                  "--route", "lut", "--lut-size", "9"])
    assert learned.exit_code == 0, learned.output
    summary = _last_json(learned.stdout)
    assert summary["route"] == "lut" and summary["lut_size"] == 9 and summary["lut_fit"]["psnr"] > 35
    assert summary["light_field"]["used"] is False  # a global grade: no light field under the LUT
    cube = tmp_path / "instr" / "warm.cube"
    assert read_cube(cube).size == 9 and isinstance(colour.io.read_LUT(str(cube)), colour.LUT3D)

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    _photo(20, (50, 30)).save(photos / "a.png")
    _photo(21, (36, 36)).save(photos / "b.png")
    applied = runner.invoke(app, ["apply", str(tmp_path / "instr" / "warm.safetensors"), str(photos),
                                  "--output", str(out), "--model", "no-such-model-folder"])
    assert applied.exit_code == 0, applied.output
    summary = _last_json(applied.stdout)
    assert summary["route"] == "lut" and summary["written"] == 2 and summary["model_id"] is None
    edited = np.asarray(Image.open(out / "a.png"), dtype=float)
    assert np.abs(edited - np.asarray(_warm(_photo(20, (50, 30))), dtype=float)).mean() < 3

    red = np.asarray(Image.open(out / "b.png"), dtype=float) * np.array([1.3, 0.85, 0.85])
    Image.fromarray(red.clip(0, 255).astype(np.uint8)).save(out / "b.png")
    report = tmp_path / "qc.jsonl"
    checked = runner.invoke(app, ["qc", str(tmp_path / "instr" / "warm.safetensors"), str(photos), str(out),
                                  "--output", str(report)])
    assert checked.exit_code == 0, checked.output
    lines = [json.loads(line) for line in checked.stdout.strip().splitlines() if line.startswith("{")]
    statuses = {line["image"]: line["status"] for line in lines if "image" in line}
    assert statuses["a"] == "pass" and statuses["b"] in ("flag", "fail")
    assert lines[-1]["counts"] == {"pass": 1, statuses["b"]: 1}
    assert lines[-1] == json.loads(report.read_text().strip().splitlines()[-1])

    bad = runner.invoke(app, ["qc", str(tmp_path / "instr" / "nosuch.safetensors"), str(photos), str(out)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and bad.output.startswith("error:")
