"""Worker policy: what this worker did, served to Prometheus and recorded for `difflabel status`.

Counters move when a round's commit has gone through, so they count what the job store
holds: evaluations (``rate(difflabel_evaluations_total[1m])`` is evaluations per second),
rounds, items finished done or failed. Model loads are timed; the batch size in use is the
job's ``--batch-size`` under this device's ceiling (``DIFFLABEL_MAX_BATCH``, halved on out of
memory). Two readings are taken when Prometheus scrapes, not kept up to date: the depth of
this worker's broker queues (Redis list lengths) and, on CUDA only, device memory.

A ``difflabel worker`` is one process (Celery's solo pool, one per GPU), so one HTTP server
per worker serves everything, on ``--metrics-port`` (``DIFFLABEL_METRICS_PORT``; by default
9808 plus the CUDA device index, so the workers of a multi-GPU machine do not collide).

``Tally`` is the same figures per job for the ``job_workers`` table (``orchestrator.fleet``):
one upsert in each round's commit transaction, plus the totals from about a minute back,
kept here in memory, so `status` can show each worker's recent rate from one row.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily

from orchestrator import fleet
from orchestrator.schema import utcnow

log = logging.getLogger("difflabel.metrics")

#: The first worker's metrics port; a worker on cuda:N serves on DEFAULT_METRICS_PORT + N.
DEFAULT_METRICS_PORT = 9808
#: Jobs whose per-job window this process keeps (one in use at a time; old ones age out).
DEFAULT_JOBS_KEPT = 64

#: This process's metrics (a registry of its own: importing this module registers nothing
#: global, and the process, platform and GC collectors come along).
REGISTRY = CollectorRegistry(auto_describe=True)
disable_created_metrics()  # no *_created series: Prometheus does not need them
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

EVALUATIONS = Counter("difflabel_evaluations", "Model evaluations (item, class, sample rows) of committed "
                      "rounds; rate() gives evaluations per second.", registry=REGISTRY)
ROUNDS = Counter("difflabel_rounds", "Rounds committed: one model round over a task's items.", registry=REGISTRY)
ITEM_ROUNDS = Counter("difflabel_item_rounds", "Item rounds committed (score rows stored).", registry=REGISTRY)
ITEMS = Counter("difflabel_items_finished", "Items this worker finished, by outcome (done: labelled; "
                "failed: out of attempts or unreadable).", ["outcome"], registry=REGISTRY)
for _outcome in ("done", "failed"):
    ITEMS.labels(_outcome)  # both series exist from the start, at 0
MODEL_LOAD = Histogram("difflabel_model_load_seconds", "Seconds to load a model onto the device.",
                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=REGISTRY)
BATCH_SIZE = Gauge("difflabel_batch_size", "Rows per model call in use: the job's batch size under this "
                   "device's ceiling (DIFFLABEL_MAX_BATCH, halved on out of memory).", registry=REGISTRY)


def default_port(device) -> int:
    """DEFAULT_METRICS_PORT + the CUDA index (cuda:1 -> 9809); DEFAULT_METRICS_PORT otherwise."""
    if getattr(device, "type", None) == "cuda":
        return DEFAULT_METRICS_PORT + (device.index or 0)
    return DEFAULT_METRICS_PORT


# --------------------------------------------------------------------------- hooks


def model_loaded(seconds: float) -> None:
    MODEL_LOAD.observe(seconds)


def batch_size(rows: int) -> None:
    BATCH_SIZE.set(rows)


class _JobWindow:
    """One job's totals on this worker and a few earlier readings of them, oldest first."""

    def __init__(self, start: datetime):
        self.start = start
        self.items = self.evals = 0
        self.samples: deque[tuple[datetime, int, int]] = deque([(start, 0, 0)])

    def window(self, now: datetime, seconds: float) -> fleet.Window:
        """The newest reading at least ``seconds`` old (else the first one)."""
        edge = now - timedelta(seconds=seconds)
        while len(self.samples) > 1 and self.samples[1][0] <= edge:
            self.samples.popleft()
        at, items, evals = self.samples[0]
        return fleet.Window(at, items, evals)

    def add(self, now: datetime, items: int, evals: int) -> None:
        self.items += items
        self.evals += evals
        self.samples.append((now, self.items, self.evals))


class Tally:
    """This process's work: Prometheus counters, and its ``job_workers`` rows when it holds
    leases (``owner``; the embedded executor records nothing in the store)."""

    def __init__(self, owner: str | None, window: float = fleet.WINDOW):
        self.owner = owner
        #: The Celery node name (set when the worker is ready), as Flower shows it.
        self.node: str | None = None
        self.window = window
        #: The job of the round in progress (the heartbeat keeps its last_seen fresh).
        self.current: int | None = None
        self._jobs: OrderedDict[int, _JobWindow] = OrderedDict()

    def begin(self, job_id: int) -> None:
        """A round of ``job_id`` starts: its clock starts at this worker's first round of it."""
        self.current = job_id
        if job_id in self._jobs:
            self._jobs.move_to_end(job_id)
            return
        self._jobs[job_id] = _JobWindow(utcnow())
        while len(self._jobs) > DEFAULT_JOBS_KEPT:
            self._jobs.popitem(last=False)

    def note(self, s, job_id: int, committed, rounds: int = 1) -> Callable[[], None]:
        """In the commit's transaction (session ``s``): add ``committed`` (a
        ``lifecycle.Committed``) to this worker's row of the job. Returns what to run once
        that transaction has committed (the counters, the in-memory totals)."""
        work = fleet.Work(rounds, committed.item_rounds, committed.done, committed.failed, committed.evals)
        if job_id not in self._jobs:
            self.begin(job_id)
        jw, now = self._jobs[job_id], utcnow()
        if self.owner is not None and (work.rounds or work.item_rounds or work.done or work.failed):
            fleet.record(s, job_id, self.owner, self.node, work, first_seen=jw.start,
                         window=jw.window(now, self.window), now=now)

        def settle() -> None:
            ROUNDS.inc(work.rounds)
            ITEM_ROUNDS.inc(work.item_rounds)
            EVALUATIONS.inc(work.evals)
            ITEMS.labels("done").inc(work.done)
            ITEMS.labels("failed").inc(work.failed)
            jw.add(now, work.done + work.failed, work.evals)

        return settle


# --------------------------------------------------------------------------- read at scrape time


class QueueDepth:
    """``difflabel_queue_depth{queue}``: round tasks waiting in each of this worker's queues,
    and ``difflabel_broker_up`` (0 when the broker could not be read)."""

    def __init__(self, broker_url: str, queues: Sequence[str], timeout: float = 2.0):
        self.broker_url, self.queues, self.timeout = broker_url, tuple(queues), timeout
        self._client = None

    def _lists(self, queue: str) -> list[str]:
        # kombu's Redis transport keeps a queue's priorities 3, 6, 9 in lists of their own.
        return [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]

    def read(self) -> dict[str, int]:
        import redis

        if self._client is None:
            self._client = redis.Redis.from_url(self.broker_url, socket_timeout=self.timeout,
                                                socket_connect_timeout=self.timeout)
        pipe = self._client.pipeline(transaction=False)
        for q in self.queues:
            for name in self._lists(q):
                pipe.llen(name)
        lengths = iter(pipe.execute())
        return {q: sum(next(lengths) for _ in range(4)) for q in self.queues}

    def collect(self):
        up = GaugeMetricFamily("difflabel_broker_up", "1 if the broker answered this scrape's queue reads.")
        try:
            depths = self.read()
        except Exception as e:  # noqa: BLE001 - the broker is away: say so, keep serving the rest
            log.debug("queue depth not read: %s: %s", type(e).__name__, e)
            self._client = None
            up.add_metric([], 0)
            yield up
            return
        g = GaugeMetricFamily("difflabel_queue_depth", "Round tasks waiting in the broker queue "
                              "(read when scraped).", labels=["queue"])
        for q, n in depths.items():
            g.add_metric([q], n)
        up.add_metric([], 1)
        yield g
        yield up


class DeviceMemory:
    """CUDA memory of this worker's device: allocated, its peak, reserved, total (bytes)."""

    def __init__(self, device):
        self.index = device.index or 0

    def collect(self):
        import torch

        names = ("allocated", "peak", "reserved", "total")
        values = dict.fromkeys(names, 0)
        if torch.cuda.is_initialized():  # never initialise CUDA from the scrape thread
            values.update(allocated=torch.cuda.memory_allocated(self.index),
                          peak=torch.cuda.max_memory_allocated(self.index),
                          reserved=torch.cuda.memory_reserved(self.index),
                          total=torch.cuda.get_device_properties(self.index).total_memory)
        for name in names:
            g = GaugeMetricFamily(f"difflabel_device_memory_{name}_bytes",
                                  f"CUDA memory {name} on this worker's device (bytes).", labels=["device"])
            g.add_metric([f"cuda:{self.index}"], values[name])
            yield g


class PortInUse(RuntimeError):
    """The metrics port is taken (another worker on this machine?)."""


def serve(port: int, *, broker_url: str | None, queues: Sequence[str], device, addr: str = "0.0.0.0"):
    """Serve this process's metrics on ``port`` (a daemon thread). Raises PortInUse."""
    import errno

    from prometheus_client import start_http_server

    if broker_url:
        REGISTRY.register(QueueDepth(broker_url, queues))
    if getattr(device, "type", None) == "cuda":
        REGISTRY.register(DeviceMemory(device))
    try:
        server, _ = start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"metrics port {port} is in use") from e
        raise
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return server


def timed(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, its duration observed as a model load."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    model_loaded(time.perf_counter() - t0)
    return out
