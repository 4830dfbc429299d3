"""The wait for a pool run (`flows.dispatch.wait_for_partition_run`) on a simulated clock: how often it
asks the API, and when it gives a silent run up. No server: a fake client replays a run's states and
heartbeats, and the module's clock and sleep are the fake's."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect.states import Completed, Running

from flows import dispatch


class SimulatedRun:
    """A pool run on a simulated clock: Running from t=0, Completed at `ends_at` (None: never), with a
    heartbeat event every `beat_s` seconds (None: none at all); counts the API calls made on it."""

    def __init__(self, ends_at: float | None, beat_s: float | None):
        self.now, self.ends_at, self.beat_s = 0.0, ends_at, beat_s
        self.running, self.forced = Running(), None
        self.state_reads = self.heartbeat_reads = 0

    # the module's `time`
    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    # the sync client
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_run(self, flow_run_id):
        self.state_reads += 1
        if self.forced is not None:
            state = self.forced
        elif self.ends_at is not None and self.now >= self.ends_at:
            state = Completed()
        else:
            state = self.running
        return SimpleNamespace(id=flow_run_id, name="quiet-run", state=state, state_name=state.name)

    def read_events(self, event_filter, limit):
        self.heartbeat_reads += 1
        beats = int(self.now // self.beat_s) if self.beat_s else 0
        events = [SimpleNamespace(id=f"beat-{beats}")] if beats else []
        return SimpleNamespace(events=events)

    def set_flow_run_state(self, flow_run_id, state, force):
        assert force
        self.forced = state


@pytest.fixture
def simulate(monkeypatch):
    def start(ends_at: float | None, beat_s: float | None) -> SimulatedRun:
        run = SimulatedRun(ends_at, beat_s)
        monkeypatch.setattr(dispatch, "time", run)
        monkeypatch.setattr(dispatch, "get_client", lambda sync_client: run)
        monkeypatch.setattr(dispatch, "get_run_logger", lambda: SimpleNamespace(warning=lambda *a: None))
        return run

    return start


def wait(silence_s: float):
    return dispatch.wait_for_partition_run(uuid4(), silence_s, dispatch.DispatchGate(per_s=1000))


def test_a_finished_run_is_noticed_within_a_poll_and_heartbeats_are_read_every_few_polls(simulate):
    sim = simulate(ends_at=60.0, beat_s=30.0)
    assert wait(silence_s=120).state.is_completed()
    assert 60.0 <= sim.now <= 60.0 + dispatch.POLL_S + 0.1
    assert sim.state_reads == pytest.approx(60 / dispatch.POLL_S, abs=2)
    # One heartbeat look per HEARTBEAT_LOOK_S, not one per state poll.
    assert sim.heartbeat_reads == pytest.approx(60 / dispatch.HEARTBEAT_LOOK_S, abs=1)


def test_a_run_that_keeps_sending_heartbeats_is_never_given_up(simulate):
    sim = simulate(ends_at=400.0, beat_s=30.0)
    assert wait(silence_s=45).state.is_completed()
    assert sim.forced is None


def test_a_silent_run_is_marked_crashed_after_the_silence_and_not_before(simulate):
    sim = simulate(ends_at=None, beat_s=None)
    run = wait(silence_s=40)
    assert sim.forced.is_crashed() and run.state.is_crashed()
    assert "no heartbeat or state change" in run.state.message
    assert 40.0 < sim.now <= 40.0 + dispatch.POLL_S + 0.1
    # A short silence looks at heartbeats at least 4 times within it.
    assert sim.heartbeat_reads >= 4
