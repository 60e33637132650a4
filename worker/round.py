"""One round of a round task against the job store, shared by the Celery and embedded executors.

``run_round(runtime, task)``: lease the items (``lifecycle.claim``), load their images (local
path or S3; each decoded and encoded once per worker, then cached), run the engine's round
(``worker.step``: shared noise, batched model calls, record and prune), and commit the result
(``lifecycle.commit``). Failures are sorted by cause: an item that is at fault becomes a
``Failure`` (charged); a worker that cannot work (model, device, S3) gives its items back
uncharged and says why (``RoundOutcome.worker_error``); an unreachable database propagates
to the driver.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import db, jobs, lifecycle, s3
from orchestrator.schema import Item, Job
from orchestrator.settings import Settings
from worker import metrics
from worker.backends import Backend, load_backend
from worker.config import ScoringConfig
from worker.errors import BadImageError, DifflabelError, PermanentError, RetryableError, first_line as _line
from worker.images import decode
from worker.messages import Message, RoundTask
from worker.noise import content_key
from worker.rounds import ItemRounds
from worker.step import Entry, run_step

log = logging.getLogger("difflabel.worker")

#: Encoded images kept per worker (x0 on the CPU: 1 KB for the demo, 64 KB for SD latents).
DEFAULT_X0_CACHE = 4096
#: Label sets whose prompt embeddings a worker keeps (1,000 SD prompts: about 160 MB in fp16).
DEFAULT_COND_CACHE = 4
#: Largest object fetched from S3, in bytes.
MAX_OBJECT_BYTES = 256 * 1024 * 1024
#: Items whose round state a worker keeps between rounds (a few KB each), so the next round
#: on this worker need not read and replay every stored round.
DEFAULT_STATE_CACHE = 50_000


@dataclass
class JobContext:
    job_id: int
    model: str
    config: ScoringConfig
    labels: list[str]
    prompts: list[str]
    status: str
    queue: str | None
    #: Items per round task for this job (``ScoringConfig.items_per_task``).
    per_task: int = 1
    cond: torch.Tensor | None = None


class Runtime:
    """Per-process state: settings, database sessions, the lease holder's name, the loaded
    model and caches, and the items this process holds leases on (for the heartbeat)."""

    def __init__(self, settings: Settings, *, leases: bool = True, x0_cache: int = DEFAULT_X0_CACHE):
        self.settings = settings
        self.sessions = db.sessions(settings.database_url)
        self.device = settings.device
        #: The lease holder's name; None for the embedded executor, which takes no leases.
        self.owner: str | None = lifecycle.worker_id() if leases else None
        self._backend: Backend | None = None
        self._backend_spec: str | None = None
        self._jobs: dict[int, JobContext] = {}
        self._x0: OrderedDict[tuple, tuple[torch.Tensor, str]] = OrderedDict()
        self._x0_max = x0_cache
        #: Prompt embeddings per label set of the loaded model, shared by every job that uses
        #: the same prompts: 1,000 labels are encoded once per worker, not once per job.
        self._conds: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._states: OrderedDict[int, ItemRounds] = OrderedDict()
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        #: What this process did: Prometheus counters and its job_workers rows.
        self.tally = metrics.Tally(self.owner)

    # -- leases this process holds (renewed by worker.heartbeat) --
    def hold(self, ids) -> None:
        with self._held_lock:
            self._held.update(ids)

    def drop(self, ids) -> None:
        with self._held_lock:
            self._held.difference_update(ids)

    def drop_all(self) -> None:
        """The task is over, however it ended: whatever it still held (say its follow-ups could
        not be sent) is no longer renewed, so its leases run out and the rescuer requeues it."""
        with self._held_lock:
            self._held.clear()

    def per_task(self, job_id: int) -> int:
        """Items per round task for a job this process has loaded (else the settings' number)."""
        ctx = self._jobs.get(job_id)
        return ctx.per_task if ctx is not None else self.settings.items_per_task

    def queue_of(self, job_id: int) -> str:
        """The queue a job's rounds go to: its own, else this worker's."""
        ctx = self._jobs.get(job_id)
        return (ctx.queue if ctx is not None else None) or self.settings.queue

    def held(self) -> list[int]:
        with self._held_lock:
            return sorted(self._held)

    def backend(self, spec: str) -> Backend:
        if self._backend is None or self._backend_spec != spec:
            self._backend = None
            self._jobs = {k: v for k, v in self._jobs.items() if v.model == spec}
            self._x0.clear()
            self._conds.clear()
            self._backend = metrics.timed(load_backend, spec, device=self.device, dtype=self.settings.dtype,
                                          compile=self.settings.compile, max_batch=self.settings.max_batch)
            self._backend_spec = spec
        return self._backend

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The loaded model's confidence calibration, if it has one."""
        return self._backend.calibration if self._backend else None

    def job(self, job_id: int) -> JobContext:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise PermanentError(f"job {job_id} does not exist in the database")
            status, queue = job.status, job.queue
            ctx = self._jobs.get(job_id)
            if ctx is None:
                ctx = JobContext(job_id, job.model, ScoringConfig.from_dict(job.params),
                                 jobs.labels_of(s, job_id), jobs.prompts_of(s, job_id), status, queue,
                                 jobs.items_per_task(job, self.settings.items_per_task,
                                                     self.settings.task_evals))
                self._jobs[job_id] = ctx
        ctx.status, ctx.queue = status, queue
        return ctx

    def commit_context(self, ctx: JobContext) -> lifecycle.CommitContext:
        return lifecycle.CommitContext(ctx.job_id, ctx.labels, ctx.config, self.calibration, self.owner,
                                       self.settings.lease_seconds, self.settings.max_attempts)

    def cond(self, ctx: JobContext, backend: Backend) -> torch.Tensor:
        """The job's prompt embeddings: encoded once per (model, label set) in this process."""
        if ctx.cond is None:
            key = tuple(ctx.prompts)
            hit = self._conds.pop(key, None)
            ctx.cond = hit if hit is not None else backend.encode_prompts(ctx.prompts)
            self._conds[key] = ctx.cond
            while len(self._conds) > DEFAULT_COND_CACHE:
                self._conds.popitem(last=False)
        return ctx.cond

    def has_state(self, m: Message) -> bool:
        st = self._states.get(m.item_id)
        return st is not None and st.rounds_done == m.round

    def states(self, s, ctx: JobContext, msgs: Sequence[Message]) -> dict[int, ItemRounds]:
        """Each item's round state before ``msg.round``: kept from this worker's last round
        of it when that was round ``msg.round - 1``, else rebuilt from the stored scores."""
        out, missing = {}, []
        for m in msgs:
            if self.has_state(m):
                out[m.item_id] = self._states.pop(m.item_id)
            else:
                self._states.pop(m.item_id, None)
                missing.append(m.item_id)
        out.update(jobs.load_states(s, missing, len(ctx.labels), ctx.config))
        return out

    def keep(self, states: dict[int, ItemRounds]) -> None:
        for item_id, st in states.items():
            self._states[item_id] = st
        while len(self._states) > DEFAULT_STATE_CACHE:
            self._states.popitem(last=False)

    def read(self, uri: str) -> bytes:
        if s3.is_s3(uri):
            return s3.get_bytes(uri, self.settings.s3_endpoint_url, MAX_OBJECT_BYTES)
        try:
            return Path(uri).read_bytes()
        except OSError as e:
            raise BadImageError(f"{uri}: cannot read ({e.strerror or e})") from e

    def x0(self, backend: Backend, item: Item) -> tuple[torch.Tensor, str]:
        """(x0 (C, H, W) on the device, noise key): read, decode, encode once per worker."""
        key = (self._backend_spec, item.uri, item.etag)
        hit = self._x0.get(key)
        if hit is not None:
            self._x0.move_to_end(key)
            return hit[0].to(backend.device), hit[1]
        data = self.read(item.uri)
        image = decode(data, name=item.uri, max_pixels=self.settings.max_image_pixels)
        x = backend.encode_images([image])[0]  # (C, H, W)
        self._x0[key] = (x.cpu(), content_key(data))
        if len(self._x0) > self._x0_max:
            self._x0.popitem(last=False)
        return x, self._x0[key][1]


@dataclass
class RoundOutcome:
    """What one round hands back to the driver: ``next`` (go on, or send as follow-ups),
    ``send`` (retries and released items: through the broker, batched), ``solo`` (send one
    item per task), the items of ``next`` as read (for their URIs), and the job's status."""

    next: list[Message] = field(default_factory=list)
    send: list[Message] = field(default_factory=list)
    solo: list[Message] = field(default_factory=list)
    items: dict[int, Item] = field(default_factory=dict)
    finished: int = 0
    #: Items given back uncharged because this worker could not work on them, and why.
    released: list[Message] = field(default_factory=list)
    worker_error: str | None = None


def run_round(rt: Runtime, task: RoundTask, *, claim: bool = True, go_on: bool = False,
              known: dict[int, Item] | None = None) -> RoundOutcome:
    """Run one round of ``task``. ``claim``: lease the items first (a delivered task); a task
    going on to its items' next round already holds them. ``go_on``: the caller runs the next
    round itself. ``known``: the items as the previous round of this task read them; with
    their states in memory too, the round starts without a database read (its commit still
    checks each item's round and token under lock)."""
    ctx = rt.job(task.job_id)  # its status is decided by the claim, under the job's lock
    rt.tally.begin(ctx.job_id)
    msgs = sorted(task.items, key=lambda m: m.item_id)
    out = RoundOutcome()
    if not claim and known is not None and all(m.item_id in known and rt.has_state(m) for m in msgs):
        items = {m.item_id: known[m.item_id] for m in msgs}
        states = rt.states(None, ctx, msgs)
    else:
        with rt.sessions.begin() as s:
            if claim and rt.owner is not None:
                c = lifecycle.claim(s, RoundTask(task.job_id, tuple(msgs), task.handoff_from), owner=rt.owner,
                                    lease_seconds=rt.settings.lease_seconds, max_attempts=rt.settings.max_attempts)
                items, out.solo = c.items, c.solo
            else:
                items = _live_items(s, msgs)
            states = rt.states(s, ctx, [m for m in msgs if m.item_id in items])
        rt.hold(items)
        msgs = [m for m in msgs if m.item_id in items]
    if not msgs:
        return out
    try:
        backend = rt.backend(ctx.model)
        cond = rt.cond(ctx, backend)
    except Exception as e:  # noqa: BLE001 - the model or device, not the items: give them back
        log.error("job %s: cannot load model %r on this worker: %s", ctx.job_id, ctx.model, _line(e))
        out.worker_error = f"cannot load model {ctx.model!r} on this worker: {_line(e)}"
        out.released = _give_back(rt, ctx, msgs, out.worker_error)
        return out
    failures: list[lifecycle.Failure] = []
    entries: list[tuple[Message, Entry]] = []
    unreachable: list[Message] = []
    reason = ""
    for m in msgs:
        item = items[m.item_id]
        try:
            x0, noise_key = rt.x0(backend, item)
        except RetryableError as e:  # S3 unreachable: not this item's fault
            unreachable.append(m)
            reason = str(e)
            continue
        except PermanentError as e:
            failures.append(lifecycle.Failure(m, str(e), permanent=True))
            continue
        except DifflabelError as e:
            failures.append(lifecycle.Failure(m, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError on a huge image: this item only
            log.warning("item %s: cannot load %s: %s", m.item_id, item.uri, _line(e))
            failures.append(lifecycle.Failure(m, f"{type(e).__name__} while loading the image: {_line(e)}"))
            continue
        entries.append((m, Entry(noise_key, x0, states[m.item_id])))
    results = []
    for (m, entry), res in zip(entries, run_step(backend, cond, ctx.config, [e for _, e in entries],
                                                 isolate=True)):
        if isinstance(res, BaseException):
            log.warning("round failed for item %s: %s", m.item_id, _line(res))
            failures.append(lifecycle.Failure(m, f"{type(res).__name__}: {_line(res)}"))
        else:
            results.append(lifecycle.RoundResult(m, tuple(res[0]), res[1], entry.state))
    sizer = getattr(backend, "batch_sizer", None)
    if entries and sizer is not None:
        metrics.batch_size(sizer.size(ctx.config.batch_size))
    _fault_point("before_commit")
    with rt.sessions.begin() as s:
        done = lifecycle.commit(s, rt.commit_context(ctx), results, failures, go_on=go_on)
        settle = rt.tally.note(s, ctx.job_id, done, rounds=1 if entries else 0)
    settle()
    _fault_point("after_commit")
    by_id = {m.item_id for m in done.next}
    rt.keep({i: states[i] for i in by_id})
    out.next, out.send = done.next, done.retry
    out.items = {i: items[i] for i in by_id}
    out.finished = len(msgs) - len(done.next) - len(done.retry) - len(unreachable)
    finished_ids = {m.item_id for m in msgs} - by_id - {m.item_id for m in done.retry} - \
        {m.item_id for m in unreachable}
    rt.drop(finished_ids)
    if unreachable:
        out.released, out.worker_error = _give_back(rt, ctx, unreachable, reason), reason
    return out


def _give_back(rt: Runtime, ctx: JobContext, msgs: Sequence[Message], reason: str) -> list[Message]:
    """Release ``msgs`` uncharged; returns their new messages (the driver sends them)."""
    with rt.sessions.begin() as s:
        return lifecycle.release(s, ctx.job_id, msgs, owner=rt.owner, lease_seconds=rt.settings.lease_seconds,
                                 reason=reason)


def fail_all(rt: Runtime, task: RoundTask, reason: str) -> list[Message]:
    """An unexpected error broke the task: count an attempt for each of its items (the one
    catch-all, at the task boundary). Returns the retries to send."""
    ctx = rt.job(task.job_id)
    with rt.sessions.begin() as s:
        done = lifecycle.commit(s, rt.commit_context(ctx), [], [lifecycle.Failure(m, reason) for m in task.items])
        settle = rt.tally.note(s, ctx.job_id, done, rounds=0)
    settle()
    rt.drop(m.item_id for m in task.items)
    return done.retry


def _live_items(s, msgs: Sequence[Message]) -> dict[int, Item]:
    """The items that ``msgs`` may still process (unlocked read, rechecked at commit)."""
    from sqlalchemy import select

    got = {i.id: i for i in s.scalars(select(Item).where(Item.id.in_([m.item_id for m in msgs])))}
    return {m.item_id: got[m.item_id] for m in msgs if lifecycle.live(got.get(m.item_id), m)}


_FAULT = None


def _fault_point(name: str) -> None:
    """Tests only: DIFFLABEL_TEST_CRASH=after_commit kills this process at that point, as a
    SIGKILL or power cut would (read once; never set in production)."""
    global _FAULT
    if _FAULT is None:
        import os

        _FAULT = os.environ.get("DIFFLABEL_TEST_CRASH", "")
    if _FAULT == name:
        import os

        log.error("DIFFLABEL_TEST_CRASH: dying %s", name.replace("_", " "))
        os._exit(137)
