"""record_run at the end of two nights: the analytics rows match the manifest, the event reaches the
Prefect API with counts, rates and the jump label, the run table artifact keeps one version per
night, and the Automation documented in docs/monitoring.md fires on the jump and only on it."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from prefect import flow, get_client
from prefect.runtime import flow_run

from storage.run_layout import gate_key
from storage.run_table import read_run_category_table, read_run_table
from storage.store import LocalStore, open_store
from tasks.monitor import ARTIFACT_KEY, EVENT, JUMP_LABEL, flag_rate_jumps, record_run, review_opened_at
from tests.monitoring_data import NIGHTS, REVIEW_WAIT_S, write_night

pytestmark = pytest.mark.usefixtures("prefect_harness")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring.md"


@flow(name="monitor-test-night")
def night_flow(output_uri: str, night: int) -> dict:
    """A stand-in for the end of catalogue_refresh: the night's outputs exist, then record_run."""
    run_id, summary, instructions, _ = write_night(open_store(output_uri), night)
    payload = record_run(output_uri, run_id, summary, instructions)
    return {"payload": payload, "flow_run_id": str(flow_run.id)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    uri = str(tmp_path_factory.mktemp("monitor") / "store")
    nights = [night_flow(uri, night) for night in range(len(NIGHTS))]
    return {"uri": uri, "nights": nights}


def test_run_rows_count_what_the_manifest_holds_and_name_the_flow_run(recorded):
    runs = read_run_table(open_store(recorded["uri"])).to_pandas().set_index("run_id")
    first, second = runs.loc[NIGHTS[0]], runs.loc[NIGHTS[1]]
    assert list(runs.index) == list(NIGHTS)
    assert (first["items"], first["qc_pass"], first["qc_flag"], first["qc_fail"], first["qc_error"]) == (24, 20, 2, 1, 1)
    assert (second["qc_flag"], second["review_approved"], second["review_rejected"]) == (5, 18, 6)
    assert first["published"] == 20 and first["published_created"] == 20
    assert (first["instructions_learned"], second["instructions_reused"]) == (3, 3)
    assert list(first["instruction_routes"]) == ["instruct"]
    # human review: first pause (gate.json opened_at) to alice's decision; the auto night has no gate
    assert first["review_wait_s"] == REVIEW_WAIT_S and list(first["reviewers"]) == ["alice"]
    assert pd.isna(second["review_wait_s"]) and second["review_policy"] == "auto_approve_passing"
    # 23 edited images from the first item's start (298 s) to the last timed item's end (520 s)
    assert first["images_edited"] == 23 and first["edit_wall_s"] == 222.0
    assert first["images_per_s"] == round(23 / 222, 4)
    assert first["learn_s"] == 60.0 and second["learn_s"] == 0.5
    with get_client(sync_client=True) as client:
        prefect_run = client.read_flow_run(uuid.UUID(recorded["nights"][0]["flow_run_id"]))
    assert first["flow_run_id"] == str(prefect_run.id)
    assert first["flow_run_url"].startswith("http")
    assert first["flow_run_url"].endswith(f"/flow-runs/flow-run/{prefect_run.id}")
    assert first["scheduled_at"] == pd.Timestamp(prefect_run.expected_start_time)


def test_category_rows_carry_qc_errors_instruction_and_review(recorded):
    store = open_store(recorded["uri"])
    rows = read_run_category_table(store).to_pandas().set_index(["run_id", "category"])
    warm = rows.loc[(NIGHTS[0], "warm-studio")]
    assert (warm["items"], warm["qc_fail"], warm["qc_error"]) == (8, 1, 1)
    assert list(warm["error_codes"]) == [{"error_code": "truncated", "items": 1}]
    assert warm["instruction_status"] == "learned" and warm["instruction_route"] == "instruct"
    assert warm["review_wait_s"] == REVIEW_WAIT_S
    soft = rows.loc[(NIGHTS[1], "soft-matte")]
    assert (soft["qc_flag"], soft["instruction_status"]) == (4, "reused")
    assert soft["contact_sheet_uri"] == store.uri_for(f"edited/run={NIGHTS[1]}/contact-sheets/soft-matte.png")


def _events(runs: list[str], timeout_s: float = 120) -> list:
    """This module's `catalogue.refresh.completed` events, one per run in `runs`, oldest first.

    Events are persisted asynchronously, and the session's test server also holds the events of other
    tests' refresh runs: wait until every one of `runs` has its event, not just for enough events.
    """
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = {f"catalogue.run.{run}" for run in runs}
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=EventFilter(
                event=EventNameFilter(name=[EVENT]), resource=EventResourceFilter(id=sorted(wanted))), limit=50).events
        ours = [e for e in events if e.resource.id in wanted]
        if {e.resource.id for e in ours} == wanted or time.monotonic() > deadline:
            return sorted(ours, key=lambda e: e.occurred)
        time.sleep(1)


def test_event_reaches_the_api_with_counts_rates_and_the_jump(recorded):
    events = _events(NIGHTS)
    assert [e.resource.id for e in events] == [f"catalogue.run.{run}" for run in NIGHTS]
    first, second = (e.payload for e in events)
    assert first == recorded["nights"][0]["payload"]
    assert first["qc"] == {"pass": 20, "flag": 2, "fail": 1, "error": 1}
    assert first["rates"]["flag_rate"] == round(2 / 24, 4)
    assert first["review"]["wait_s"] == REVIEW_WAIT_S and first["flag_rate_jumped"] == {}
    # soft-matte went from 1 of 8 flagged to 4 of 8: +0.375 over its previous night
    assert second["flag_rate_jumped"] == {"soft-matte": {"flag_rate": 0.5, "baseline": 0.125}}
    assert [e.resource.get(JUMP_LABEL) for e in events] == ["false", "true"]
    flow_runs = {r.id for r in events[1].related if r.role == "flow-run"}
    assert f"prefect.flow-run.{recorded['nights'][1]['flow_run_id']}" in flow_runs


def test_run_table_artifact_keeps_one_version_per_night(recorded):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))
    rows = [json.loads(a.data)[0] if isinstance(a.data, str) else a.data[0] for a in artifacts]
    # The Prefect test server is shared by the session: other tests' refresh runs publish versions of
    # the same artifact, so count this module's nights only.
    ours = [r for r in rows if r["run_id"] in NIGHTS]
    assert sorted(r["run_id"] for r in ours) == sorted(NIGHTS)
    assert {r["run_id"]: r["qc_flag"] for r in ours} == {NIGHTS[0]: 2, NIGHTS[1]: 5}
    assert all(a.type == "table" for a in artifacts)


def documented_automation() -> dict:
    """The JSON block that follows `<!-- automation: flag-rate-jump -->` in docs/monitoring.md."""
    text = DOCS.read_text()
    found = re.search(r"<!-- automation: flag-rate-jump -->\s*```json\n(.*?)```", text, re.DOTALL)
    assert found, "docs/monitoring.md lost its automation block"
    return json.loads(found.group(1))


def test_documented_automation_fires_on_the_jump_night_only(recorded):
    from prefect.events import AutomationCore
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    spec = documented_automation()
    for action in spec["actions"]:
        action["block_document_id"] = str(uuid.uuid4())  # the docs name a placeholder
    automation = AutomationCore.model_validate(spec)
    trigger = EventTrigger.model_validate(automation.trigger.model_dump())
    events = _events(NIGHTS)
    covered = [trigger.covers(ReceivedEvent.model_validate(e.model_dump())) for e in events]
    assert covered == [False, True]


def test_flag_rate_jump_needs_a_previous_night_and_the_threshold():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "scheduled_at": pd.to_datetime(["2026-11-01", "2026-11-02",
                                                                                       "2026-11-03"], utc=True)})
    categories = pd.DataFrame({
        "run_id": ["a", "b", "c", "c"], "category": ["warm", "warm", "warm", "new"],
        "items": [10, 10, 10, 10], "qc_flag": [1, 3, 3, 9],
    })
    assert flag_rate_jumps(runs, categories, "a", 0.1) == {}
    assert flag_rate_jumps(runs, categories, "b", 0.1) == {"warm": {"flag_rate": 0.3, "baseline": 0.1}}
    assert flag_rate_jumps(runs, categories, "b", 0.25) == {}
    # baseline is the median of previous nights (0.1, 0.3 -> 0.2); a category seen first tonight never jumps
    assert flag_rate_jumps(runs, categories, "c", 0.1) == {"warm": {"flag_rate": 0.3, "baseline": 0.2}}


def test_a_gate_record_without_opened_at_gives_no_review_wait(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(gate_key("night-1"), json.dumps({"deadline": "2026-11-02T02:00:00+00:00"}).encode())
    assert review_opened_at(store, "night-1") is None
    assert review_opened_at(store, "night-2") is None
    store.put_bytes(gate_key("night-3"), json.dumps({"deadline": "2026-11-02T02:00:00+00:00",
                                                     "opened_at": "2026-11-01T02:30:00+00:00"}).encode())
    assert review_opened_at(store, "night-3").isoformat() == "2026-11-01T02:30:00+00:00"


def test_no_link_to_a_flow_run_when_prefect_has_no_ui_url(monkeypatch):
    """An embedded server has no UI URL; Prefect then builds "None/flow-runs/..." links."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    import tasks.monitor

    started = datetime(2026, 11, 1, 2, tzinfo=UTC)
    monkeypatch.setattr(tasks.monitor, "flow_run", SimpleNamespace(
        id="abc", ui_url="None/flow-runs/flow-run/abc", scheduled_start_time=started))
    assert tasks.monitor.flow_run_fields() == {"flow_run_id": "abc", "flow_run_url": None, "scheduled_at": started}
