"""Sending packs of partitions and shards to the GPU work pool and waiting for them: the Prefect API
mechanics behind `edit_partition_on_pool` (flows/refresh.py). One `DispatchGate` per process paces
every API call; a run whose worker was lost is found by its silence, marked Crashed, and its
unfinished pieces are sent again."""

from __future__ import annotations

import math
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

from tasks.edit import finished, finished_pieces
from tasks.params import PartitionPiece, RefreshConfig
from tasks.review import run_tag

# A partition whose runs keep crashing (a poison input that kills the process) stops being resent.
MAX_DISPATCHES = 3
# Seconds between two looks at a pool run's state: one API call per look and run, paced by the gate.
# A run's end is noticed this late at most, so it adds to every run's dispatch cost (half of it on
# average: ~1 s per run at 2 s, measured in benchmarks/scale.py's timeline).
POLL_S = 1
# Seconds between two looks at a taken run's newest heartbeat (one more API call). Heartbeats come
# every 30 s at the fastest and silence is judged over minutes, so looking at every state poll only
# doubled the calls; a heartbeat seen up to this late only makes the silence clock start later.
HEARTBEAT_LOOK_S = 10
HEARTBEAT = "prefect.flow-run.heartbeat"
# Prefect API calls of the dispatch in flight at once, whatever the rate.
API_AT_ONCE = 4
# A pool run's parameters (its pack of work orders) stay below this: the API refuses more than 512 KB.
MAX_RUN_PARAMETER_BYTES = 400_000


def run_on_pool(pieces: list[PartitionPiece], deployment: str, silence_s: int, calls_per_s: float) -> list[dict]:
    """A pack of pieces as one run of `deployment`, waited for, and its unfinished pieces sent again
    after a lost worker (at most MAX_DISPATCHES times in a row); returns one summary per piece, read
    from the store."""
    started = time.monotonic()
    done = finished_pieces(pieces)
    gate = dispatch_gate(calls_per_s)
    for dispatch in range(1, MAX_DISPATCHES + 1):
        todo = [piece for i, piece in enumerate(pieces) if i not in done]
        if not todo:
            break
        name = pack_name(todo)
        parameters = {"pieces": [piece.model_dump(mode="json") for piece in todo]}
        with gate.creation():
            run = run_deployment(deployment, parameters=parameters, timeout=0, tags=[run_tag(todo[0].job.run_id)])
        get_run_logger().info("%s: sent as flow run %s after %.1f s of checks and dispatch (%d finished "
                              "pieces not sent)", name, run.name, time.monotonic() - started, len(pieces) - len(todo))
        run = wait_for_partition_run(run.id, silence_s, gate)
        if run.state.is_completed():
            fresh = {i: {**finished(piece.job, piece.shard), "skipped": False}
                     for i, piece in enumerate(pieces) if i not in done}
            return [done.get(i) or fresh[i] for i in range(len(pieces))]
        if not run.state.is_crashed():
            raise RuntimeError(f"{name}: flow run {run.name} ended {run.state_name}")
        # Pieces the lost run finished (their marker or shard file is written) are not sent again.
        started = time.monotonic()
        done |= {i: {**summary, "skipped": False} for i, summary in finished_pieces(pieces).items() if i not in done}
        if len(done) < len(pieces) and dispatch < MAX_DISPATCHES:
            get_run_logger().warning("%s: flow run %s crashed (%s); sending its unfinished pieces again "
                                     "(dispatch %d of %d)", name, run.name, run.state.message,
                                     dispatch + 1, MAX_DISPATCHES)
    if len(done) < len(pieces):
        raise RuntimeError(f"{pack_name(pieces)}: {MAX_DISPATCHES} flow runs crashed in a row")
    return [done[i] for i in range(len(pieces))]


def pack_name(pieces: list[PartitionPiece]) -> str:
    """How logs name a pack: its pieces, the first few of a long one."""
    labels = [piece.label for piece in pieces]
    shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
    return f"partition {shown}" if len(labels) == 1 else f"pack of {len(labels)} ({shown})"


class DispatchGate:
    """The one bound on the dispatch's Prefect API calls in this process: at most `at_once` calls at a
    time and `per_s` calls per second, however many shards are in flight (thousands of unpaced
    `run_deployment` calls and polls are what draws HTTP 429 from an API).

    A call takes the next free start time, one `1 / per_s` after the previous one, and sleeps until
    then while holding one of the `at_once` slots.

    Flow runs are created one at a time (`creation`): each creation writes two rows (the parent's
    task run for the child, then the run), and on a SQLite server two creations at once collide on
    its write lock; the loser gets HTTP 503 and Prefect's client waits 2 s before it retries (seen in
    benchmarks/scale.py: the second of two packs was created 2.4 s after its dispatch began, the first
    after 0.3 s).
    """

    def __init__(self, per_s: float, at_once: int = API_AT_ONCE):
        self.per_s, self.at_once = per_s, at_once
        self._slots = threading.BoundedSemaphore(at_once)
        self._lock = threading.Lock()
        self._creating = threading.Lock()
        self._next = 0.0

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._slots:
            with self._lock:
                start = max(self._next, time.monotonic())
                self._next = start + 1 / self.per_s
            time.sleep(max(0.0, start - time.monotonic()))
            yield

    @contextmanager
    def creation(self) -> Iterator[None]:
        """A paced call that also holds the process's one flow-run creation turn."""
        with self._creating, self.call():
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
    beat, beat_looked = None, -math.inf
    with get_client(sync_client=True) as client:
        while True:
            with gate.call():
                run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            taken = run.state is not None and run.state.type in (StateType.PENDING, StateType.RUNNING,
                                                                   StateType.CANCELLING)
            if taken:
                if time.monotonic() - beat_looked >= min(HEARTBEAT_LOOK_S, silence_s / 4):
                    with gate.call():
                        beat = last_heartbeat(client, flow_run_id)
                    beat_looked = time.monotonic()
                sign = (run.state.id, beat)
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
    """How many shards (or pool runs) are worked on at once: `workers` threads in this process, or on
    the pool path `pool_in_flight`, else the pool's concurrency limit, else every one of them (the
    workers' own `--limit` then decides how many run; the rest wait in the pool's queue, and the
    waiting threads' API calls are paced by the `DispatchGate`)."""
    if not config.gpu_work_pool:
        return config.workers
    if config.pool_in_flight:
        return config.pool_in_flight
    with get_client(sync_client=True) as client:
        limit = client.read_work_pool(config.gpu_work_pool).concurrency_limit
    return max(1, limit or shards)


def pool_runners(config: RefreshConfig) -> int:
    """How many pool runs can run at once, which the night's packs are a multiple of:
    `pool_in_flight`, else the pool's concurrency limit, else the pool's online workers (each
    taking one at a time: start GPU workers with `--limit 1`), else 1."""
    if config.pool_in_flight:
        return config.pool_in_flight
    with get_client(sync_client=True) as client:
        limit = client.read_work_pool(config.gpu_work_pool).concurrency_limit
    return limit or max(1, len(online_workers(config.gpu_work_pool)))


def online_workers(pool: str) -> set[str]:
    """The names of the pool's workers the server counts as online (heartbeats within ~90 s)."""
    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return {w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}


def check_partition_deployment(deployment: str, work_pool: str) -> None:
    """Refuse to fan out to a deployment that would run on another pool than the one configured."""
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
    if found.work_pool_name != work_pool:
        raise ValueError(f"deployment {deployment} runs on pool {found.work_pool_name!r}, "
                         f"config says gpu_work_pool={work_pool!r}")
