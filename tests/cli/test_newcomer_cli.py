"""Issue 18: what a new user meets at the edges of `retouch` (errors, checks before work, help, output)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

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


def test_short_help_and_version() -> None:
    assert "Usage" in runner.invoke(app, ["-h"]).stdout
    assert "Usage" in runner.invoke(app, ["learn", "-h"]).stdout
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("retouch ")

