"""Issue 18: a run pausing for review logs its run id and the exact `retouch review approve` command,
and that command, pasted with a name, resumes it."""

from __future__ import annotations

import logging
import re
import shlex
import threading
import time

from prefect import flow
from typer.testing import CliRunner

from cli.main import app
from cli.review import ReviewCliError, find_paused_flow_run
from flows.review import review_and_publish
from storage.store import open_store
from tasks.params import ReviewConfig
from tests.flows.review_helpers import write_run

runner = CliRunner()


@flow
def gate(config: dict, run_id: str) -> dict:
    return review_and_publish(config["store_uri"], run_id, ReviewConfig(timeout_s=60, poll_interval_s=1))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_pause_log_line_names_the_run_and_a_command_that_resumes_it(prefect_harness, tmp_path) -> None:
    store = open_store(str(tmp_path))
    write_run(store, "log-1")
    records = _Records()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(records)
    outputs: dict[str, object] = {}

    def reviewer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                find_paused_flow_run("log-1")
                break
            except ReviewCliError:
                time.sleep(0.3)
        line = next(m for m in records.messages if "waiting for review" in m)
        outputs["line"] = line
        command = re.search(r"retouch (review approve .*?) \(or", line).group(1).replace("NAME", "erin")
        outputs["approve"] = runner.invoke(app, shlex.split(command))

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    try:
        result = gate({"store_uri": store.uri}, "log-1")
    finally:
        logger.removeHandler(records)
    thread.join(10)
    assert outputs["line"].startswith("run log-1: waiting for review")
    assert "retouch review approve log-1 --reviewer NAME --all-passing" in outputs["line"]
    assert outputs["approve"].exit_code == 0, outputs["approve"].output
    assert result["reviewers"] == ["erin"]
