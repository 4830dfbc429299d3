"""`retouch ls` and `retouch validate` on a small tree with known problems."""

from __future__ import annotations

import io

from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from storage.store import LocalStore


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def _shop(tmp_path) -> LocalStore:
    store = LocalStore(tmp_path / "shop")
    store.put_bytes("exemplars/warm/p1/before.png", _png())
    store.put_bytes("exemplars/warm/p1/after.png", _png())
    store.put_bytes("exemplars/warm/p2/before.png", _png())
    store.put_bytes("catalogue/a.png", _png())
    store.put_bytes("catalogue/broken.png", b"not a png")
    store.put_bytes(
        "catalogue/index.csv",
        b"image_id,key,category,partition\na,catalogue/a.png,warm,p0\nb,catalogue/broken.png,warm,p0\n"
        b"c,catalogue/gone.png,cool,p1\n",
    )
    return store


def test_ls_lists_sorted_keys(tmp_path):
    store = _shop(tmp_path)
    result = CliRunner().invoke(app, ["ls", store.uri, "--prefix", "exemplars/"])
    assert result.exit_code == 0
    assert result.output.split() == [
        "exemplars/warm/p1/after.png",
        "exemplars/warm/p1/before.png",
        "exemplars/warm/p2/before.png",
    ]


def test_validate_reports_every_problem_and_fails(tmp_path):
    _shop(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "shop"), "--decode"])
    assert result.exit_code == 1
    codes = sorted(line.split()[0] for line in result.output.splitlines()[:-2])  # then found ..., N problem(s)
    assert codes == ["missing_image", "missing_pair_half", "not_an_image", "unknown_category"]
    assert "catalogue/gone.png" in result.output and result.output.endswith(
        f"4 problem(s) in {tmp_path / 'shop'}\n"
    )


def test_validate_passes_a_clean_root(tmp_path):
    store = LocalStore(tmp_path / "clean")
    store.put_bytes("exemplars/warm/p1/before.png", _png())
    store.put_bytes("exemplars/warm/p1/after.png", _png())
    store.put_bytes("catalogue/a.png", _png())
    store.put_bytes("catalogue/index.csv", b"image_id,key,category,partition\na,catalogue/a.png,warm,p0\n")
    result = CliRunner().invoke(app, ["validate", store.uri, "--decode"])
    assert result.exit_code == 0, result.output
    assert "0 problem(s)" in result.output
