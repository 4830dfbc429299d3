"""The dashboard: Streamlit's AppTest renders it on two nights of real run tables (local folder and
SeaweedFS), and `retouch dashboard` serves it on loopback only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import typer
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import cli
from cli import dashboard
from storage.store import LocalStore, open_store
from tests.conftest import free_port
from tests.monitoring_data import NIGHTS, build_two_nights

APP = str(Path(cli.__file__).with_name("dashboard_app.py"))


@pytest.fixture(scope="module")
def local_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = LocalStore(tmp_path_factory.mktemp("dashboard") / "store")
    build_two_nights(store)
    return store.uri


def render(monkeypatch: pytest.MonkeyPatch, store_uri: str | None) -> AppTest:
    if store_uri is None:
        monkeypatch.delenv(dashboard.STORE_ENV, raising=False)
    else:
        monkeypatch.setenv(dashboard.STORE_ENV, store_uri)
    app = AppTest.from_file(APP, default_timeout=120).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def image_captions(app: AppTest) -> list[str]:
    return [image.caption for element in app.get("image") for image in element.proto.imgs]


def test_app_shows_trends_the_latest_night_and_its_flagged_items(monkeypatch, local_uri):
    app = render(monkeypatch, local_uri)
    assert app.selectbox[0].options == [NIGHTS[1], NIGHTS[0]]
    assert [h.value for h in app.header] == [f"Night {NIGHTS[1]}", "Trends across nights",
                                             f"Night {NIGHTS[1]}: QC, errors and flagged items",
                                             "Review state and latency"]
    assert metrics(app) == {"items": "24", "pass": "18", "flag": "5", "fail": "0", "error": "1",
                            "published": "18", "review": "decided"}
    assert "Flagged items (5)" in [s.value for s in app.subheader]
    # five flagged items, each with a before and an after thumbnail read from the store
    assert sorted(image_captions(app)) == [""] * 3 + ["after"] * 5 + ["before"] * 5  # "": contact sheets
    assert len(app.get("vega_lite_chart")) >= 4
    links = " ".join(m.value for m in app.markdown)
    assert "runs/flow-run/00000000-0000-0000-0000-000000000001" in links
    assert "contact-sheets/soft-matte.png" in links


def test_choosing_the_other_night_shows_its_numbers(monkeypatch, local_uri):
    app = render(monkeypatch, local_uri)
    app.selectbox[0].select(NIGHTS[0]).run()
    assert not app.exception
    assert app.header[0].value == f"Night {NIGHTS[0]}"
    assert metrics(app)["flag"] == "2" and metrics(app)["fail"] == "1"
    assert "Flagged items (3)" in [s.value for s in app.subheader]
    by_category = app.dataframe[0].value.set_index("category")
    assert by_category.loc["warm-studio", "review_wait_h"] == 2.5


def test_app_reads_a_store_on_s3(monkeypatch, s3_uri):
    build_two_nights(open_store(s3_uri))
    app = render(monkeypatch, s3_uri)
    assert metrics(app)["flag"] == "5"
    assert sorted(image_captions(app)).count("after") == 5
    links = " ".join(m.value for m in app.markdown)
    assert "X-Amz-Signature=" in links  # contact sheets as presigned links


def test_app_without_runs_says_what_is_missing(monkeypatch, tmp_path):
    app = render(monkeypatch, LocalStore(tmp_path / "empty").uri)
    assert "No run has recorded its run table here yet" in app.info[0].value
    assert not app.header


def test_app_without_a_store_says_how_to_start_it(monkeypatch):
    app = render(monkeypatch, None)
    assert "retouch dashboard STORE_URI" in app.error[0].value


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads listening sockets from /proc")
def test_dashboard_command_serves_the_app_on_loopback_only(local_uri, tmp_path):
    port = free_port()
    script = ("import typer\nfrom cli import dashboard\napp = typer.Typer()\napp.callback()(lambda: None)\n"
              "dashboard.register(app)\napp()\n")
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", script, "dashboard", local_uri, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(cli.__file__).parents[1])
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                    assert answer.read() == b"ok"
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and b"<title>" in page.read()
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing on 0.0.0.0 or ::
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert f"on http://127.0.0.1:{port}" in (tmp_path / "dashboard.log").read_text()


def test_dashboard_command_refuses_a_store_it_cannot_open():
    app = typer.Typer()
    app.callback()(lambda: None)
    dashboard.register(app)
    result = CliRunner().invoke(app, ["dashboard", "ftp://example/bucket"])
    assert result.exit_code == 2
    assert "unsupported scheme" in result.output
