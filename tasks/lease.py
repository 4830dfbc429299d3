"""One live flow run per run id: a lease object in the store, renewed while its flow run lives.

Two flow runs writing one run id's keys at once would overwrite each other's manifest parts and
markers, and decide rows the other one's reviewer never saw. The first flow run creates
`runs/run=<run_id>/lease.json` (create-if-absent: exactly one wins); a daemon thread renews its expiry
while the flow run lives (paused for review included), and the flow run's end releases it
(`release_run_lease`, a flow state hook). The same flow run coming back (a resume after suspend, a
retry) takes its own lease again.

A flow run killed without a trace (SIGKILL, a lost machine) cannot release: its lease lapses after
`RETOUCH_RUN_LEASE_TTL_S` seconds (default 120) and the run id can then be taken again. Taking over
a lapsed lease is a plain overwrite, not an atomic swap: two flow runs starting within the same
moment on the id of a dead one could both proceed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime, timedelta

from prefect.context import FlowRunContext

from storage.run_layout import lease_key
from storage.store import NotFoundError, StoreError, open_store

LEASE_TTL_ENV = "RETOUCH_RUN_LEASE_TTL_S"
DEFAULT_LEASE_TTL_S = 120

log = logging.getLogger(__name__)
_renewals: dict[str, _Renewal] = {}


class RunLeaseError(RuntimeError):
    """Another live flow run holds the run id."""


def lease_ttl_s() -> int:
    return max(2, int(os.environ.get(LEASE_TTL_ENV) or DEFAULT_LEASE_TTL_S))


def _record(holder: str, ttl_s: int) -> bytes:
    now = datetime.now(UTC)
    return json.dumps({"holder": holder, "renewed_at": now.isoformat(),
                       "expires_at": (now + timedelta(seconds=ttl_s)).isoformat()}).encode()


def _read(store_uri: str, run_id: str) -> dict | None:
    try:
        lease = json.loads(open_store(store_uri).get_bytes(lease_key(run_id)))
        datetime.fromisoformat(lease["expires_at"])
        return lease if isinstance(lease.get("holder"), str) else None
    except NotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable lease protects nobody; it is taken over


def acquire_run_lease(store_uri: str, run_id: str, holder: str | None = None) -> None:
    """Hold the run id for `holder` (default: the current flow run) or raise `RunLeaseError`."""
    if holder is None:
        ctx = FlowRunContext.get()
        holder = str(ctx.flow_run.id) if ctx and ctx.flow_run else f"pid-{os.getpid()}"
    store, key, ttl = open_store(store_uri), lease_key(run_id), lease_ttl_s()
    if not store.create_if_absent(key, _record(holder, ttl)):
        current = _read(store_uri, run_id)
        if current and current["holder"] != holder and datetime.fromisoformat(current["expires_at"]) > datetime.now(UTC):
            raise RunLeaseError(
                f"run id {run_id!r} is in use by flow run {current['holder']} (lease {store.uri_for(key)} "
                f"until {current['expires_at']}); wait until that run ends, or, if it died, until its "
                "lease lapses"
            )
        store.put_bytes(key, _record(holder, ttl), content_type="application/json")
    _stop(holder)
    renewal = _Renewal(store_uri, run_id, holder, ttl)
    _renewals[holder] = renewal
    renewal.start()


def release_run_lease(flow: object = None, flow_run: object = None, state: object = None) -> None:
    """Stop renewing the flow run's lease and delete it; a Prefect flow state hook (any final state)."""
    ctx = FlowRunContext.get()
    holder = str(getattr(flow_run, "id", "") or (ctx.flow_run.id if ctx and ctx.flow_run else ""))
    renewal = _stop(holder)
    if renewal is not None:
        current = _read(renewal.store_uri, renewal.run_id)
        if current and current["holder"] == holder:
            open_store(renewal.store_uri).delete(lease_key(renewal.run_id))


def _stop(holder: str) -> _Renewal | None:
    renewal = _renewals.pop(holder, None)
    if renewal is not None:
        renewal.stopped.set()
        renewal.join(5)
    return renewal


class _Renewal(threading.Thread):
    """Rewrites the lease's expiry every quarter of its time to live, while the holder still owns it."""

    def __init__(self, store_uri: str, run_id: str, holder: str, ttl_s: int) -> None:
        super().__init__(daemon=True, name=f"run-lease-{run_id}")
        self.store_uri, self.run_id, self.holder, self.ttl_s = store_uri, run_id, holder, ttl_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.ttl_s / 4):
            try:
                current = _read(self.store_uri, self.run_id)
                if current and current["holder"] != self.holder:
                    log.warning("run %s: lease taken over by %s; no longer renewed", self.run_id, current["holder"])
                    return
                open_store(self.store_uri).put_bytes(lease_key(self.run_id), _record(self.holder, self.ttl_s),
                                                     content_type="application/json")
            except StoreError as exc:  # a store hiccup: try again at the next beat
                log.warning("run %s: could not renew the lease: %s", self.run_id, exc)
