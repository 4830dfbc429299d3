"""One live flow run per run id: the lease object and what catalogue_refresh does with it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.refresh import catalogue_refresh
from storage.run_layout import lease_key
from storage.store import LocalStore
from tasks.lease import LEASE_TTL_ENV, RunLeaseError, acquire_run_lease, release_run_lease
from tasks.params import RefreshConfig


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStore:
    monkeypatch.setenv(LEASE_TTL_ENV, "2")
    return LocalStore(tmp_path / "out")


def test_a_second_live_holder_is_refused_the_same_one_comes_back_and_release_frees_it(store) -> None:
    acquire_run_lease(store.uri, "r1", holder="flow-run-a")
    with pytest.raises(RunLeaseError, match="run id 'r1' is in use by flow run flow-run-a"):
        acquire_run_lease(store.uri, "r1", holder="flow-run-b")
    acquire_run_lease(store.uri, "r1", holder="flow-run-a")  # a resume of the same flow run
    time.sleep(2.5)  # renewed while it lives: still refused after its time to live
    with pytest.raises(RunLeaseError):
        acquire_run_lease(store.uri, "r1", holder="flow-run-b")
    release_run_lease(flow_run=type("FlowRun", (), {"id": "flow-run-a"})())
    assert not store.exists(lease_key("r1"))
    acquire_run_lease(store.uri, "r1", holder="flow-run-b")
    release_run_lease(flow_run=type("FlowRun", (), {"id": "flow-run-b"})())


def test_the_lease_of_a_killed_flow_run_lapses(store) -> None:
    lapsed = datetime.now(UTC) - timedelta(seconds=1)
    store.put_bytes(lease_key("r2"), json.dumps({"holder": "killed", "renewed_at": lapsed.isoformat(),
                                                 "expires_at": lapsed.isoformat()}).encode())
    acquire_run_lease(store.uri, "r2", holder="rerun")
    assert json.loads(store.get_bytes(lease_key("r2")))["holder"] == "rerun"
    release_run_lease(flow_run=type("FlowRun", (), {"id": "rerun"})())


def test_catalogue_refresh_refuses_a_run_id_another_live_flow_run_holds(prefect_harness, store) -> None:
    until = datetime.now(UTC) + timedelta(hours=1)
    store.put_bytes(lease_key("busy-1"), json.dumps({"holder": "other-flow-run", "renewed_at": until.isoformat(),
                                                     "expires_at": until.isoformat()}).encode())
    state = catalogue_refresh(RefreshConfig(store_uri=store.uri, run_id="busy-1"), return_state=True)
    assert state.is_failed()
    with pytest.raises(RunLeaseError, match="in use by flow run other-flow-run"):
        state.result()
    assert [k for k in store.list() if not k.startswith("runs/")] == []  # refused before anything ran
    assert json.loads(store.get_bytes(lease_key("busy-1")))["holder"] == "other-flow-run"
