"""One round task's work, shared by the Celery worker and the embedded executor.

``run_round(runtime, job_id, messages)``: read the items' state, load their images
(local path or S3; each image decoded and encoded once per worker, then cached), score
the survivors of every item in shared model calls, and hand each item to the
scheduler in one transaction. Returns the next round's messages.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import db, jobs, scheduler, s3
from orchestrator.jobs import Message
from orchestrator.schema import Item, Job, JobStatus
from orchestrator.settings import Settings
from worker.backends import Backend, load_backend
from worker.config import ScoringConfig
from worker.errors import BadImageError, DifflabelError, PermanentError
from worker.images import decode
from worker.noise import content_key
from worker.rounds import ItemRounds
from worker.scoring import RoundRequest, score_round

log = logging.getLogger("difflabel.worker")

#: Encoded images kept per worker (x0 on the CPU: 1 KB for the demo, 64 KB for SD latents).
DEFAULT_X0_CACHE = 4096
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
    cond: torch.Tensor | None = None


class Runtime:
    """Per-process state: settings, database sessions, the loaded model and caches."""

    def __init__(self, settings: Settings, device: str | None = None, x0_cache: int = DEFAULT_X0_CACHE):
        self.settings = settings
        self.sessions = db.sessions(settings.database_url)
        self.device = device
        self._backend: Backend | None = None
        self._backend_spec: str | None = None
        self._jobs: dict[int, JobContext] = {}
        self._x0: OrderedDict[tuple, tuple[torch.Tensor, str]] = OrderedDict()
        self._x0_max = x0_cache
        self._states: OrderedDict[int, ItemRounds] = OrderedDict()

    def backend(self, spec: str) -> Backend:
        if self._backend is None or self._backend_spec != spec:
            self._backend = None
            self._jobs = {k: v for k, v in self._jobs.items() if v.model == spec}
            self._x0.clear()
            self._backend = load_backend(spec, device=self.device)
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
            status = job.status
            ctx = self._jobs.get(job_id)
            if ctx is None:
                ctx = JobContext(job_id, job.model, ScoringConfig.from_dict(job.params),
                                 jobs.labels_of(s, job_id), jobs.prompts_of(s, job_id), status)
                self._jobs[job_id] = ctx
        ctx.status = status
        return ctx

    def cond(self, ctx: JobContext, backend: Backend) -> torch.Tensor:
        if ctx.cond is None:  # text embeddings once per (model, label set)
            ctx.cond = backend.encode_prompts(ctx.prompts)
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
        out.update(scheduler.load_states(s, missing, len(ctx.labels), ctx.config))
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
        image = decode(data, name=item.uri)
        x = backend.encode_images([image])[0]  # (C, H, W)
        self._x0[key] = (x.cpu(), content_key(data))
        if len(self._x0) > self._x0_max:
            self._x0.popitem(last=False)
        return x, self._x0[key][1]


@dataclass
class RoundOutcome:
    """What a round task hands back: the next round's messages (batched as usual) and
    messages to send again one item per task (see ``scheduler.claim``)."""

    next: list[Message]
    solo: list[Message]
    #: The items of ``next`` as read at this round's start (for their URIs), by id.
    items: dict[int, Item] = field(default_factory=dict)


def run_round(rt: Runtime, job_id: int, messages: Sequence[Message], *, claim: bool = True,
              reclaim: bool = False, keep_started: bool = False,
              known: dict[int, Item] | None = None) -> RoundOutcome:
    """Process one round of ``messages``. ``claim``: mark the items started first (a broker
    may deliver a task twice or to a worker that then dies); the in-process executor, and a
    task going on to its items' next round, need not. ``reclaim``: see ``scheduler.claim``.
    ``keep_started``: the caller will run the next round itself (``scheduler.commit_round``).
    ``known``: the items as the previous round of this task read them; when every item is
    there and its state in memory, the round starts without a database read (its commit
    still checks each item's round and token under lock)."""
    ctx = rt.job(job_id)
    if ctx.status != JobStatus.RUNNING.value:
        return RoundOutcome([], [])
    msgs = sorted(messages, key=lambda m: m.item_id)  # lock order: no deadlocks between workers
    solo: list[Message] = []
    finished = False
    if not claim and known is not None and all(m.item_id in known and rt.has_state(m) for m in msgs):
        items = {m.item_id: known[m.item_id] for m in msgs}
        states = rt.states(None, ctx, msgs)
    else:
        items, states, solo, finished = _start(rt, ctx, msgs, claim, reclaim)
        msgs = [m for m in msgs if m.item_id in items]
    if finished:
        with rt.sessions.begin() as s:
            jobs.refresh_job_status(s, ctx.job_id)
    if not msgs:
        return RoundOutcome([], solo)
    failures: list[tuple[Message, str, bool]] = []
    try:
        backend = rt.backend(ctx.model)
        cond = rt.cond(ctx, backend)
    except DifflabelError as e:  # this worker cannot load the model: retry elsewhere
        return RoundOutcome(_commit(rt, ctx, [], [(m, str(e), False) for m in msgs]), solo)
    ready: list[tuple[Message, RoundRequest]] = []
    for m in msgs:
        item, state = items[m.item_id], states[m.item_id]
        try:
            x0, noise_key = rt.x0(backend, item)
        except PermanentError as e:
            failures.append((m, str(e), True))
            continue
        except DifflabelError as e:
            failures.append((m, str(e), False))
            continue
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError on a huge image: this item only
            log.warning("item %s: cannot load %s: %s", m.item_id, item.uri, _line(e))
            failures.append((m, f"{type(e).__name__} while loading the image: {_line(e)}", False))
            continue
        n = state.plan(ctx.config)
        ready.append((m, RoundRequest(noise_key, x0, list(state.survivors), m.round, max(n, 1))))
    results = _score(backend, ready, cond, ctx.config, failures)
    nexts = _commit(rt, ctx, [(m, states[m.item_id], req, e) for (m, req), e in results], failures,
                    keep_started)
    rt.keep({m.item_id: states[m.item_id] for m in nexts if m.item_id in states})
    return RoundOutcome(nexts, solo, {m.item_id: items[m.item_id] for m in nexts if m.item_id in items})


def _start(rt: Runtime, ctx: JobContext, msgs: list[Message], claim: bool, reclaim: bool):
    """One transaction: claim the items (or check they are live) and read their states."""
    solo: list[Message] = []
    finished = False
    with rt.sessions.begin() as s:
        if claim:
            c = scheduler.claim(s, msgs, max_attempts=rt.settings.max_attempts,
                                in_flight_for=rt.settings.stale_after, reclaim=reclaim)
            items, solo, finished = c.items, c.solo, c.finished  # detached, still loaded
        else:
            items = scheduler.live_items(s, msgs)
        states = rt.states(s, ctx, [m for m in msgs if m.item_id in items])
    return items, states, solo, finished


def fail_all(rt: Runtime, job_id: int, messages: Sequence[Message], reason: str) -> list[Message]:
    """Count a failed attempt for every item of a task that broke unexpectedly; returns
    the messages to retry (items with attempts left)."""
    return _commit(rt, rt.job(job_id), [], [(m, reason, False) for m in sorted(messages, key=lambda m: m.item_id)])


def _score(backend: Backend, ready, cond, config, failures) -> list[tuple[Any, Any]]:
    """Score all requests together; if that fails, one by one so one bad item fails alone."""
    if not ready:
        return []
    try:
        errs = score_round(backend, [r for _, r in ready], cond, config)
        return list(zip(ready, errs))
    except Exception as e:  # noqa: BLE001 - isolate the item that breaks the batch
        if len(ready) == 1:
            log.warning("round failed for item %s: %s", ready[0][0].item_id, e)
            failures.append((ready[0][0], f"{type(e).__name__}: {_line(e)}", False))
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return []
        out = []
        for one in ready:
            out += _score(backend, [one], cond, config, failures)
        return out


def _commit(rt: Runtime, ctx: JobContext, scored, failures, keep_started: bool = False) -> list[Message]:
    """One transaction for the whole round: the items locked in one statement, the score rows
    written in one; then, separately, maybe finish the job."""
    nexts: list[Message] = []
    finished = False
    with rt.sessions.begin() as s:
        locked = scheduler.lock_items(s, [x[0].item_id for x in scored] + [f[0].item_id for f in failures])
        rows: list[dict] = []
        for m, state, req, errors in sorted(scored, key=lambda x: x[0].item_id):
            nxt = scheduler.commit_round(s, m, state, list(req.classes), errors, ctx.config, ctx.labels,
                                         rt.calibration, keep_started, locked=locked, score_rows=rows)
            nexts += [nxt] if nxt else []
            finished |= nxt is None
        scheduler.insert_scores(s, rows)
        for m, reason, permanent in failures:
            nxt = scheduler.fail(s, m, reason, permanent=permanent, max_attempts=rt.settings.max_attempts,
                                 locked=locked)
            nexts += [nxt] if nxt else []
            finished |= nxt is None
    if finished:
        # After the commit, so two workers finishing the last items cannot both miss it.
        with rt.sessions.begin() as s:
            jobs.refresh_job_status(s, ctx.job_id)
    return nexts


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
