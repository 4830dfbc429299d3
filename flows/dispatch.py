"""Sending shards to the GPU work pool and waiting for them: the Prefect API mechanics behind
`edit_partition_on_pool` (flows/refresh.py). One `DispatchGate` per process paces every API call;
a run whose worker was lost is found by its silence, marked Crashed and sent again."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect import get_client, get_run_logger
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Cancelled, Crashed

from tasks.edit import finished
from tasks.params import PartitionJob, RefreshConfig
from tasks.review import run_tag

# A partition whose runs keep crashing (a poison input that kills the process) stops being resent.
MAX_DISPATCHES = 3
# Seconds between two looks at a partition run on the pool: two API calls per look and partition.
POLL_S = 5
HEARTBEAT = "prefect.flow-run.heartbeat"
# Prefect API calls of the dispatch in flight at once, whatever the rate.
API_AT_ONCE = 4


def run_on_pool(job: PartitionJob, deployment: str, silence_s: int, shard: int | None, calls_per_s: float) -> dict:
    """One shard as a run of `deployment`, waited for, and sent again after a lost worker (at most
    MAX_DISPATCHES times in a row); returns its summary, read from the store."""
    if (done := finished(job, shard)) is not None:
        return done
    gate = dispatch_gate(calls_per_s)
    name = job.partition if shard is None else f"{job.partition} shard {shard}"
    parameters = {"job": job.model_dump(mode="json"), **({"shard": shard} if shard is not None else {})}
    for dispatch in range(1, MAX_DISPATCHES + 1):
        with gate.call():
            run = run_deployment(deployment, parameters=parameters, timeout=0, tags=[run_tag(job.run_id)])
        run = wait_for_partition_run(run.id, silence_s, gate)
        if run.state.is_completed():
            return {**finished(job, shard), "skipped": False}
        if not run.state.is_crashed():
            raise RuntimeError(f"partition {name}: flow run {run.name} ended {run.state_name}")
        get_run_logger().warning("partition %s: flow run %s crashed (%s); sending the partition again "
                                 "(dispatch %d of %d)", name, run.name, run.state.message,
                                 dispatch + 1, MAX_DISPATCHES)
    raise RuntimeError(f"partition {name}: {MAX_DISPATCHES} flow runs crashed in a row")


class DispatchGate:
    """The one bound on the dispatch's Prefect API calls in this process: at most `at_once` calls at a
    time and `per_s` calls per second, however many shards are in flight (thousands of unpaced
    `run_deployment` calls and polls are what draws HTTP 429 from an API).

    A call takes the next free start time, one `1 / per_s` after the previous one, and sleeps until
    then while holding one of the `at_once` slots.
    """

    def __init__(self, per_s: float, at_once: int = API_AT_ONCE):
        self.per_s, self.at_once = per_s, at_once
        self._slots = threading.BoundedSemaphore(at_once)
        self._lock = threading.Lock()
        self._next = 0.0

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._slots:
            with self._lock:
                start = max(self._next, time.monotonic())
                self._next = start + 1 / self.per_s
            time.sleep(max(0.0, start - time.monotonic()))
            yield


_GATES: dict[float, DispatchGate] = {}
_GATES_LOCK = threading.Lock()


def dispatch_gate(per_s: float) -> DispatchGate:
    """The process's gate for this rate: every shard of a refresh shares it."""
    with _GATES_LOCK:
        return _GATES.setdefault(per_s, DispatchGate(per_s))


def wait_for_partition_run(flow_run_id: UUID, silence_s: float, gate: DispatchGate) -> FlowRun:
    """The partition run once it is final; a run its worker lost is marked Crashed first.

    A run a worker has taken (Pending, Running, Cancelling) proves it is alive by changing state or
    by sending flow-run heartbeats (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, set on the partition
    deployment). One that does neither for `silence_s` (a SIGKILLed or vanished worker: nothing is
    left to report it) is marked Crashed here, or Cancelled if someone had asked to cancel it.
    Silence is measured on this process's own clock, so clock skew between machines does not count.
    A run still waiting in the pool's queue (Scheduled, Late) is waited for without a bound: it waits
    for capacity, not for a dead worker, and Prefect shows it as Late.
    """
    seen, since = None, time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            with gate.call():
                run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            taken = run.state is not None and run.state.type in (StateType.PENDING, StateType.RUNNING,
                                                                   StateType.CANCELLING)
            if taken:
                with gate.call():
                    sign = (run.state.id, last_heartbeat(client, flow_run_id))
            else:
                sign = None
            if sign != seen:
                seen, since = sign, time.monotonic()
            elif taken and time.monotonic() - since > silence_s:
                give_up = Cancelled if run.state.type == StateType.CANCELLING else Crashed
                message = (f"no heartbeat or state change for {time.monotonic() - since:.0f} s while "
                           f"{run.state_name}: its worker was lost")
                get_run_logger().warning("flow run %s: %s; marking it %s", run.name, message, give_up.__name__)
                with gate.call():
                    client.set_flow_run_state(flow_run_id, give_up(message=message), force=True)
                continue
            time.sleep(POLL_S)


def last_heartbeat(client: SyncPrefectClient, flow_run_id: UUID) -> UUID | None:
    """The id of the newest heartbeat event of the flow run, if any."""
    page = client.read_events(EventFilter(event=EventNameFilter(name=[HEARTBEAT]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])),
                              limit=1)
    return page.events[0].id if page.events else None


def in_flight(config: RefreshConfig, shards: int) -> int:
    """How many shards are worked on at once: `workers` threads in this process, or on the pool path
    `pool_in_flight`, else the pool's concurrency limit, else every shard (the workers' own `--limit`
    then decides how many run; the rest wait in the pool's queue, and the waiting threads' API calls
    are paced by the `DispatchGate`)."""
    if not config.gpu_work_pool:
        return config.workers
    if config.pool_in_flight:
        return config.pool_in_flight
    with get_client(sync_client=True) as client:
        limit = client.read_work_pool(config.gpu_work_pool).concurrency_limit
    return max(1, limit or shards)


def check_partition_deployment(deployment: str, work_pool: str) -> None:
    """Refuse to fan out to a deployment that would run on another pool than the one configured."""
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
    if found.work_pool_name != work_pool:
        raise ValueError(f"deployment {deployment} runs on pool {found.work_pool_name!r}, "
                         f"config says gpu_work_pool={work_pool!r}")
