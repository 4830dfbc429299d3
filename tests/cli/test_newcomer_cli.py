"""Issue 18: what a new user meets at the edges of `retouch` (errors, checks before work, help, output)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from tests.tiny_models import build_tiny_ip2p

runner = CliRunner()


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_user_facing_failure_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["apply", str(tmp_path / "nosuch.safetensors"), str(tmp_path), "--output",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert "nosuch" in lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "apply", str(tmp_path / "nosuch.safetensors"), str(tmp_path),
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code != 0 and result.exception is not None
    assert not isinstance(result.exception, SystemExit)


def test_every_command_sub_apps_included_has_the_error_boundary() -> None:
    def commands(typer_app):
        yield from typer_app.registered_commands
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance)

    names = {command.callback.__wrapped__.__name__ for command in commands(app)}
    assert {"learn_command", "apply_command", "approve_cmd", "refresh"} <= names


def test_short_help_and_version() -> None:
    assert "Usage" in runner.invoke(app, ["-h"]).stdout
    assert "Usage" in runner.invoke(app, ["learn", "-h"]).stdout
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("retouch ")



# -- inputs and outputs checked before any model loads ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip2p(tmp_path_factory.mktemp("models") / "tiny-ip2p")


def _photo(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _shop(root: Path, categories: tuple[str, ...] = ("warm",)) -> Path:
    for category in categories:
        for i in range(2):
            folder = root / "exemplars" / category / f"p{i}"
            folder.mkdir(parents=True)
            before = _photo(i)
            before.save(folder / "before.png")
            after = np.asarray(before).astype(float) * np.array([1.1, 1.0, 0.8])
            Image.fromarray(after.clip(0, 255).astype(np.uint8)).save(folder / "after.png")
    return root


def _learn(root: Path, output: Path, model: Path, category: str = "warm"):
    return runner.invoke(app, ["learn", str(root), "--category", category, "--output", str(output),
                               "--steps", "0", "--model", str(model), "--route", "lut"])


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A folder holding warm.safetensors, as `learn --output DIR` writes it (LUT route: no model at apply)."""
    base = tmp_path_factory.mktemp("learned")
    result = _learn(_shop(base / "shop"), base / "instr", tiny_model)
    assert result.exit_code == 0, result.output
    return base / "instr"


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model is a test failure: these checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("cli.instruct._load_model", refuse)


def _photos(folder: Path, names: tuple[str, ...]) -> Path:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _photo(10 + i).save(folder / name)
    return folder


def _apply(instruction: str, images: Path, output: Path, *extra: str):
    return runner.invoke(app, ["apply", instruction, str(images), "--output", str(output), *extra])


def test_apply_names_the_instruction_typed_when_it_is_missing(tmp_path: Path, learned: Path, no_model) -> None:
    photos = _photos(tmp_path / "photos", ("a.png",))
    typed = f"{learned}/nosuch.safetensors"
    result = _apply(typed, photos, tmp_path / "out")
    assert result.exit_code == 2
    assert _error_lines(result) == [f"error: instruction {typed} not found"]


def test_apply_takes_the_learn_output_folder_the_sidecar_or_a_category(tmp_path: Path, learned: Path) -> None:
    photos = _photos(tmp_path / "photos", ("a.png", "b.jpg"))
    for n, (instruction, extra) in enumerate([
        (str(learned), ()), (str(learned / "warm.json"), ()), (str(learned), ("--category", "warm")),
    ]):
        result = _apply(instruction, photos, tmp_path / f"out{n}", *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.splitlines()[-1])["written"] == 2
        assert sorted(p.name for p in (tmp_path / f"out{n}").iterdir()) == ["a.png", "b.png"]
    result = _apply(str(learned), photos, tmp_path / "out9", "--category", "cold")
    assert result.exit_code == 2 and f"instruction {learned}/cold.safetensors not found" in result.stderr


def test_apply_refuses_clashing_stems_naming_them(tmp_path: Path, learned: Path, no_model) -> None:
    photos = _photos(tmp_path / "photos", ("a/item.jpg", "b/item.jpg", "item.png", "other.png"))
    result = _apply(str(learned), photos, tmp_path / "out")
    assert result.exit_code == 2
    assert "item.png <- a/item.jpg, b/item.jpg, item.png" in result.stderr
    assert not (tmp_path / "out").exists()


def test_apply_refuses_a_bad_output_before_the_work(tmp_path: Path, learned: Path, no_model) -> None:
    photos = _photos(tmp_path / "photos", ("a.png",))
    (tmp_path / "file").write_text("x")
    for output, says in [
        (tmp_path / "x.safetensors", "not a file"),
        (photos / "edited", "inside the input"),
        (tmp_path / "file", "is a file"),
        (tmp_path / "file" / "sub", "not writable"),
    ]:
        result = _apply(str(learned), photos, output)
        assert result.exit_code == 2, (output, result.output)
        assert len(_error_lines(result)) == 1 and says in result.stderr, result.stderr


def test_a_missing_or_empty_input_is_not_a_silent_success(tmp_path: Path, learned: Path, no_model) -> None:
    result = _apply(str(learned), tmp_path / "nosuch", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _apply(str(learned), tmp_path / "empty", tmp_path / "out")
    assert result.exit_code == 2 and "no images" in result.stderr
    listed = runner.invoke(app, ["ls", str(tmp_path / "nonexistent")])
    assert listed.exit_code == 1 and "warning:" in listed.stderr and "does not exist" in listed.stderr


def test_learn_checks_root_category_and_output_before_the_model(tmp_path: Path, no_model) -> None:
    root = _shop(tmp_path / "shop", ("warm", "cold"))
    result = runner.invoke(app, ["learn", str(tmp_path / "nosuch"), "--category", "warm", "--output",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = runner.invoke(app, ["learn", str(root), "--category", "nosuch", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "categories: cold, warm" in result.stderr
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["learn", str(root), "--category", "warm", "--output",
                                 str(tmp_path / "file" / "out")])
    assert result.exit_code == 2 and "not writable" in result.stderr


# -- quiet output, a line per phase ------------------------------------------------------------------


def test_learn_prints_each_phase_and_no_third_party_noise(tmp_path: Path, tiny_model: Path) -> None:
    """A real process: the environment defaults are set by cli/main.py before transformers loads."""
    root = _shop(tmp_path / "shop")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    done = subprocess.run(
        [sys.executable, "-c", "from cli.main import app; app()", "learn", str(root), "--category", "warm",
         "--output", str(tmp_path / "instr"), "--steps", "0", "--model", str(tiny_model), "--route", "lut"],
        check=False, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "requires torchvision" not in done.stderr and "telemetry" not in done.stderr.lower()
    phases = [line for line in done.stderr.splitlines() if line.startswith("learn warm: ")]
    assert [line.split(": ", 1)[1].split(";")[0].split(" ")[0] for line in phases] == [
        "loading", "2", "model", "route"]
    assert "saving to" in phases[-1]


# -- help, the config template, the refresh summary ----------------------------------------------------


def test_help_shows_examples_and_real_defaults() -> None:
    from editing.instruct import LearnConfig

    for command in ("learn", "apply", "edit", "qc", "validate", "ls", "refresh", "demo"):
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "Example:" in result.stdout, command
    learn_help = runner.invoke(app, ["learn", "--help"], terminal_width=200).stdout
    assert "LearnConfig]" not in learn_help
    assert f"[default: {LearnConfig.model_fields['steps'].default}]" in learn_help


def test_print_config_is_a_commented_template_of_the_defaults(tmp_path: Path) -> None:
    from tasks.params import RefreshConfig

    result = runner.invoke(app, ["refresh", "--print-config"])
    assert result.exit_code == 0
    text = result.stdout
    assert "store_uri:  # required" in text and "# Instruction learning." in text and "\nqc:\n" in text
    filled = text.replace("store_uri:  # required", "store_uri: /shop")
    assert RefreshConfig.model_validate(yaml.safe_load(filled)) == RefreshConfig(store_uri="/shop")
    (tmp_path / "bad.yaml").write_text("store_uri: /shop\nlearn: {steps: -1}\n")
    bad = runner.invoke(app, ["refresh", "--config", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and _error_lines(bad) == [
        "error: invalid RefreshConfig: learn.steps: Input should be greater than or equal to 0"]


SUMMARY = {
    "run_id": "r1", "store_uri": "/shop", "output_uri": "/out",
    "edited_uri": "file:///out/edited/run%3Dr1", "manifest_uri": "file:///out/manifest/run%3Dr1",
    "categories": {"warm": {"category": "warm", "items": 3, "qc_status": {"pass": 2, "flag": 1},
                            "instruction": "learned, route lut"}},
    "partitions": {"total": 1, "done": 1, "skipped": 0}, "instructions": {"learned": 1, "reused": 0},
    "review": {"outcome": "decided", "review_status": {"approved": 3}}, "timings_s": {"total": 1.5},
}


def test_refresh_prints_a_table_with_plain_paths_or_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.refresh

    monkeypatch.setattr(flows.refresh, "catalogue_refresh", lambda config: SUMMARY)
    (tmp_path / "c.yaml").write_text("store_uri: /shop\n")
    table = runner.invoke(app, ["refresh", "--config", str(tmp_path / "c.yaml"), "--table"])
    assert table.exit_code == 0, table.output
    assert "/out/edited/run=r1" in table.stdout and "%3D" not in table.stdout
    assert "decided; approved 3" in table.stdout
    assert any(line.split()[:5] == ["warm", "3", "2", "1", "0"] for line in table.stdout.splitlines())
    as_json = runner.invoke(app, ["refresh", "--config", str(tmp_path / "c.yaml"), "--json"])
    assert json.loads(as_json.stdout) == SUMMARY


def test_two_identical_learn_runs_give_the_same_instruction_hash(tmp_path: Path, tiny_model: Path) -> None:
    root = _shop(tmp_path / "shop")
    first, second = (_learn(root, tmp_path / name, tiny_model) for name in ("one", "two"))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    one, two = (json.loads(r.stdout.splitlines()[-1]) for r in (first, second))
    assert one["instruction_sha256"] == two["instruction_sha256"]
    sidecars = [json.loads((tmp_path / name / "warm.json").read_text()) for name in ("one", "two")]
    assert all("route_wall_time_s" in s for s in sidecars)  # kept in the sidecar, out of the hash
    result = _apply(str(tmp_path / "one"), _photos(tmp_path / "photos", ("a.png",)), tmp_path / "out")
    assert result.exit_code == 0, result.output  # and the new hash verifies on load


# -- the README's manifest examples, run as written -----------------------------------------------------


def _readme_block(marker: str) -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", readme, re.DOTALL)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def test_the_readme_manifest_examples_work_when_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the folder `make demo` ran in, as a user would paste them."""
    from storage.store import open_store
    from tests.flows.review_helpers import write_run

    write_run(open_store(str(tmp_path / "demo-output" / "store")), "2026-11-21")
    repo = Path(__file__).resolve().parents[2]
    pasted = subprocess.run([sys.executable, "-c", _readme_block("manifest-pandas-example")], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, check=False)
    assert pasted.returncode == 0, pasted.stderr
    assert all(status in pasted.stdout for status in ("pass", "flag", "fail", "error"))
    monkeypatch.chdir(tmp_path)
    duckdb = pytest.importorskip("duckdb")
    counts = duckdb.sql(_readme_block("manifest-duckdb-example")).fetchall()
    assert sum(n for *_, n in counts) == 6 and {status for status, *_ in counts} == {"pass", "flag", "fail", "error"}


# -- retouch validate ---------------------------------------------------------------------------------------


def test_validate_reports_every_problem_at_once_with_file_line_numbers(tmp_path: Path) -> None:
    root = _shop(tmp_path / "shop")
    (root / "exemplars" / "warm" / "p9").mkdir()
    _photo(9).save(root / "exemplars" / "warm" / "p9" / "before.png")  # no after
    _photos(root / "catalogue", ("a.png", "b.png"))
    (root / "catalogue" / "index.csv").write_text(
        "image_id,key,category,partition\n"      # line 1
        "a,catalogue/a.png,warm,p0\n"            # line 2
        "b,,warm,p0\n"                           # line 3: empty key
        "a,catalogue/b.png,warm,p0\n"            # line 4: duplicate id
        "c,catalogue/../c.png,warm,p1\n"         # line 5: bad key
        "d,catalogue/gone.png,cool,p1\n"         # line 6: missing image, unknown category
    )
    result = runner.invoke(app, ["validate", str(root)])
    assert result.exit_code == 1
    out = result.stdout
    assert "column 'key' is empty in line 3" in out
    assert "'a' in line 2, 4" in out
    assert "line 5 (c): bad key" in out
    assert "catalogue/gone.png: listed in the catalogue index but absent" in out
    assert "index categories without exemplars: ['cool']" in out
    assert "missing_pair_half" in out
    assert out.endswith(f"6 problem(s) in {root}\n")


def test_validate_counts_what_it_found_on_a_good_shop(tmp_path: Path) -> None:
    root = _shop(tmp_path / "shop")
    _photos(root / "catalogue", ("a.png", "b.png"))
    (root / "catalogue" / "index.csv").write_text(
        "image_id,key,category,partition\na,catalogue/a.png,warm,p0\nb,catalogue/b.png,warm,p1\n")
    result = runner.invoke(app, ["validate", str(root)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-2:] == [
        "found 1 categories, 2 exemplar pairs, 2 index rows, 2 partitions", f"0 problem(s) in {root}"]


def test_qc_takes_the_learn_output_folder_and_refuses_nothing_to_check(tmp_path: Path, learned: Path) -> None:
    photos = _photos(tmp_path / "photos", ("a.png",))
    assert _apply(str(learned), photos, tmp_path / "edited").exit_code == 0
    checked = runner.invoke(app, ["qc", str(learned), str(photos), str(tmp_path / "edited")])
    assert checked.exit_code == 0, checked.output
    (tmp_path / "empty").mkdir()
    nothing = runner.invoke(app, ["qc", str(learned), str(photos), str(tmp_path / "empty")])
    assert nothing.exit_code == 2 and _error_lines(nothing)[0].startswith("error: no edited photo under")


def test_edit_checks_photos_and_output_before_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("editing.models.load_model", refuse)
    photos = _photos(tmp_path / "photos", ("a/item.jpg", "b/item.jpg"))
    clash = runner.invoke(app, ["edit", str(photos), "--target-prompt", "a sepia photo", "--output", str(tmp_path / "o")])
    assert clash.exit_code == 2 and "item.png <- a/item.jpg, b/item.jpg" in clash.stderr
    missing = runner.invoke(app, ["edit", str(tmp_path / "nosuch"), "--target-prompt", "x", "--output", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
