"""Every state change of items and jobs, in one place, each under the row locks it needs.

Item states and who moves an item between them (the executors, the CLI and the rescuer
call only these functions; nothing else writes ``items.status``, ``token`` or the lease):

    state                  meaning                                   left by
    ---------------------  ----------------------------------------  ------------------------------
    pending                queued: a message with ``token`` exists   claim (-> leased), cancel,
                           or is about to be sent                    requeue_lost, resume
    pending, leased        a worker scores it; ``lease_token`` is    commit (-> pending / done /
                           the message it runs, renewed by its       failed / cancelled), release,
                           heartbeat until ``lease_expires_at``      rescue (only once expired)
    pending, handing off   committed; the holder is sending the      claim of the new message,
                           follow-up (``lease_token != token``)      end_handoff, rescue (expired)
    done / failed          final (``retry_failed`` puts failed       retry_failed
                           items back to round 0)
    cancelled              stopped where it was (its rounds kept)    resume

Rules (after River's and Oban's rescuers, see README "Lifecycle"):

* **Leases, not timers.** A delivered message takes the item's lease; the holder's heartbeat
  renews it. Only an expired lease is rescued. Nothing (resume, retry, repair, the sweep,
  cancel) takes an item from a live lease or rewrites a round the holder may commit.
* **Attempts are charged only to a guilty item**: it cannot be decoded (permanent), it failed
  on its own (``commit`` failures), or its worker died while holding it alone. A worker that
  dies holding a batch costs its items nothing: they are counted in ``rescues`` and run
  alone next, so a second death is their own. Worker-side failures (model, device, S3,
  database) ``release`` the items uncharged.
* **Lock order**: the job row first, then its items in id order; bulk requeues skip rows a
  worker has locked (``SKIP LOCKED``: such a row is mid-commit and gets its token from it).
  A job finishes in the same transaction as its last item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.jobs import pack_round
from orchestrator.schema import Item, ItemStatus, Job, JobStatus, RoundScores, utcnow
from worker.config import ScoringConfig
from worker.errors import UsageError
from worker.messages import Message, RoundTask, chunks, new_token
from worker.results import summarise
from worker.rounds import ItemRounds

PENDING, DONE, FAILED, CANCELLED = (ItemStatus.PENDING.value, ItemStatus.DONE.value, ItemStatus.FAILED.value,
                                    ItemStatus.CANCELLED.value)
RUNNING = JobStatus.RUNNING.value

#: Rows per bulk UPDATE when many items are requeued at once.
CHUNK = 5_000


def worker_id() -> str:
    """A lease holder's name: host, process and a random part (a restarted pid is new)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{new_token()[:6]}"


def lock_job(s: Session, job_id: int) -> Job:
    job = s.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise UsageError(f"no job {job_id}: `difflabel list` shows the jobs")
    return job


def lock_items(s: Session, item_ids: Iterable[int]) -> dict[int, Item]:
    """Lock the items for update in one statement, in id order (no deadlocks between workers)."""
    ids = sorted(set(item_ids))
    if not ids:
        return {}
    q = select(Item).where(Item.id.in_(ids)).order_by(Item.id).with_for_update()
    return {i.id: i for i in s.scalars(q.execution_options(populate_existing=True))}


def live(item: Item | None, msg: Message) -> bool:
    """Is ``msg`` the one outstanding message for ``item``?"""
    return (item is not None and item.status == PENDING and item.round == msg.round
            and item.token == msg.token)


def _aware(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:  # SQLite returns naive UTC datetimes
        from datetime import timezone

        return t.replace(tzinfo=timezone.utc)
    return t


def _lease_live(item: Item, now: datetime) -> bool:
    return item.lease_owner is not None and _aware(item.lease_expires_at) > now


def _clear_lease(item: Item) -> None:
    item.lease_owner = item.lease_token = item.lease_expires_at = None
    item.lease_alone = False


def _requeue(item: Item, now: datetime) -> Message:
    item.token, item.updated_at = new_token(), now
    return Message(item.id, item.round, item.token)


def _hold(item: Item, owner: str | None, lease_token: str | None, expires: datetime) -> None:
    """``owner`` keeps the item's lease after a transition: on its new token when it goes
    straight on, on the old one while it hands the new message on (see ``end_handoff``).
    The embedded executor (no owner) takes no leases."""
    if owner is None:
        _clear_lease(item)
    else:
        item.lease_owner, item.lease_token, item.lease_expires_at = owner, lease_token, expires


def _finish_item(item: Item, status: str, now: datetime, error: str | None = None) -> None:
    item.status, item.token, item.finished_at, item.updated_at = status, None, now, now
    if error is not None:
        item.error = error[:2000]
    _clear_lease(item)


# --- the job --------------------------------------------------------------------------------

def finish_job_if_done(s: Session, job: Job, now: datetime | None = None) -> str:
    """With ``job`` locked: a running job with no pending item finishes now. Returns its status."""
    if job.status != RUNNING:
        return job.status
    if s.scalar(select(exists().where(Item.job_id == job.id, Item.status == PENDING))):
        return job.status
    rows = dict(s.execute(select(Item.status, func.count()).where(Item.job_id == job.id)
                          .group_by(Item.status)).all())
    done, failed = rows.get(DONE, 0), rows.get(FAILED, 0)
    if rows.get(CANCELLED, 0):
        job.status = JobStatus.CANCELLED.value  # e.g. `retry --failed` on a cancelled job
    else:
        job.status = (JobStatus.DONE if not failed else JobStatus.FAILED if not done else JobStatus.PARTIAL).value
    job.finished_at = now or utcnow()
    return job.status


# --- a round task: claim, commit, release ------------------------------------------------------

@dataclass
class Claimed:
    """What a delivered round task may do: ``items`` to score now (leased to the caller) and
    ``solo`` messages to send again one item per task."""

    items: dict[int, Item] = field(default_factory=dict)
    solo: list[Message] = field(default_factory=list)


def _rescue(item: Item, now: datetime, max_attempts: int) -> str:
    """An expired lease: its holder is gone. Returns "failed", "solo" (run it alone next) or
    "free" (the holder had finished with it: requeue uncharged)."""
    died_scoring = item.lease_token == item.token
    alone = item.lease_alone
    _clear_lease(item)
    item.updated_at = now
    if not died_scoring:
        return "free"
    if alone:
        item.attempts += 1
        item.error = (f"a worker died while processing this item alone ({item.attempts}x): "
                      "out of memory or killed")
        if item.attempts >= max_attempts:
            _finish_item(item, FAILED, now, f"failed after {item.attempts} attempts: {item.error}")
            return "failed"
    else:
        item.rescues += 1
    return "solo"


def claim(s: Session, task: RoundTask, *, owner: str, lease_seconds: float, max_attempts: int,
          now: datetime | None = None) -> Claimed:
    """Lease the live items of a delivered task to ``owner``.

    A message whose item holds a live lease for that same message is a second delivery
    (skipped). A lease in handoff (its holder committed and sent this follow-up), or one its
    holder handed on by name (``task.handoff_from``), is taken over. An expired lease is
    rescued first (``_rescue``); a suspect (an item whose worker died under it) that came in a
    batch is sent again alone, so an image that kills workers only takes down its own task."""
    now = now or utcnow()
    out = Claimed()
    job = lock_job(s, task.job_id)
    if job.status != RUNNING:
        return out  # a stopped job's messages are dropped
    locked = lock_items(s, (m.item_id for m in task.items))
    alone = len(task.items) == 1
    finished = False
    for m in sorted(task.items, key=lambda m: m.item_id):
        item = locked.get(m.item_id)
        if not live(item, m) or item.id in out.items:
            continue  # obsolete, or a duplicate within the task
        if item.lease_owner is not None:
            if _lease_live(item, now):
                handing_off = item.lease_token != item.token
                if not (handing_off or item.lease_owner in (owner, task.handoff_from)):
                    continue  # running elsewhere right now
            elif _rescue(item, now, max_attempts) == "failed":
                finished = True
                continue
        if item.rescues > 0 and not alone:
            _clear_lease(item)
            out.solo.append(_requeue(item, now))
            continue
        item.lease_owner, item.lease_token, item.lease_alone = owner, m.token, alone
        item.lease_expires_at, item.updated_at = now + timedelta(seconds=lease_seconds), now
        out.items[item.id] = item
    if finished:
        finish_job_if_done(s, job, now)
    return out


@dataclass(frozen=True)
class RoundResult:
    """One item's scored round: ``state`` has already recorded ``errors`` (float32, (K, n)
    for ``classes``) and pruned; the store only persists what the engine decided."""

    msg: Message
    classes: tuple[int, ...]
    errors: np.ndarray
    state: ItemRounds


@dataclass(frozen=True)
class Failure:
    """An item that failed on its own: ``permanent`` (cannot be decoded) fails it at once."""

    msg: Message
    reason: str
    permanent: bool = False


@dataclass
class Committed:
    """After a round's commit: ``next`` goes on (in this task or as follow-up messages),
    ``retry`` are failed attempts to send through the broker, ``stale`` were not committed."""

    next: list[Message] = field(default_factory=list)
    retry: list[Message] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    job_status: str = RUNNING
    #: What this commit stored: items finished done and failed, score rows (item rounds)
    #: and their model evaluations (for the worker's own figures, worker.metrics).
    done: int = 0
    failed: int = 0
    item_rounds: int = 0
    evals: int = 0


@dataclass(frozen=True)
class CommitContext:
    """What a commit needs to know about the job and the holder."""

    job_id: int
    labels: Sequence[str]
    config: ScoringConfig
    calibration: dict[str, Any] | None
    owner: str | None  # None: the embedded executor, which takes no leases
    lease_seconds: float
    max_attempts: int


def commit(s: Session, ctx: CommitContext, results: Sequence[RoundResult], failures: Sequence[Failure] = (),
           *, go_on: bool = False, now: datetime | None = None) -> Committed:
    """Store a round: scores, the engine's pruning, each item's next state; the job finishes
    in this transaction if these were its last items. ``go_on``: the holder runs the next
    round itself (the lease stays on the new token); otherwise the lease stays in handoff
    until ``end_handoff``, so a crash before the follow-up is sent is rescued, not lost."""
    now = now or utcnow()
    out = Committed()
    job = lock_job(s, ctx.job_id)
    locked = lock_items(s, [r.msg.item_id for r in results] + [f.msg.item_id for f in failures])
    expires = now + timedelta(seconds=ctx.lease_seconds)
    rows: list[dict] = []
    finished = False

    def follow_up(item: Item, old_token: str, on: bool) -> Message:
        msg = _requeue(item, now)
        _hold(item, ctx.owner, item.token if on else old_token, expires)
        return msg

    for r in sorted(results, key=lambda r: r.msg.item_id):
        item = locked.get(r.msg.item_id)
        if not live(item, r.msg):
            out.stale.append(r.msg.item_id)
            continue
        rows.append(pack_round(item.id, r.msg.round, r.classes, r.errors))
        out.evals += int(r.errors.size)
        st = r.state
        item.n_evals, item.survivors, item.n_survivors = st.n_evals, list(st.survivors), len(st.survivors)
        item.round = r.msg.round + 1
        if st.finished(ctx.config):
            res = summarise(item.uri, st, ctx.labels, ctx.calibration)
            item.label, item.label_idx, item.confidence, item.margin = (res.label, res.class_index,
                                                                        res.confidence, res.margin)
            _finish_item(item, DONE, now)
            item.error = None  # a reason it once waited or failed for no longer applies
            finished = True
            out.done += 1
        elif job.status == JobStatus.CANCELLED.value:
            _finish_item(item, CANCELLED, now)  # its rounds so far are kept: resume goes on from here
        else:
            out.next.append(follow_up(item, r.msg.token, go_on))
    _insert_scores(s, rows)
    out.item_rounds = len(rows)
    for f in sorted(failures, key=lambda f: f.msg.item_id):
        item = locked.get(f.msg.item_id)
        if not live(item, f.msg):
            out.stale.append(f.msg.item_id)
            continue
        item.attempts += 1
        if f.permanent or item.attempts >= ctx.max_attempts:
            _finish_item(item, FAILED, now, f.reason if f.permanent
                         else f"failed after {item.attempts} attempts: {f.reason}")
            finished = True
            out.failed += 1
        elif job.status == JobStatus.CANCELLED.value:
            _finish_item(item, CANCELLED, now, f.reason)
        else:
            item.error = f.reason[:2000]
            out.retry.append(follow_up(item, f.msg.token, False))
    if finished:
        finish_job_if_done(s, job, now)
    out.job_status = job.status
    return out


def release(s: Session, job_id: int, msgs: Sequence[Message], *, owner: str | None, lease_seconds: float,
            reason: str = "", now: datetime | None = None) -> list[Message]:
    """A worker-side failure (model, device, S3): give the items back uncharged, noting why
    they wait (``results``/``status`` show it). Returns the messages to send; the lease stays
    in handoff until ``end_handoff``."""
    now = now or utcnow()
    lock_job(s, job_id)
    locked = lock_items(s, (m.item_id for m in msgs))
    out = []
    for m in sorted(msgs, key=lambda m: m.item_id):
        item = locked.get(m.item_id)
        if not live(item, m) or (owner is not None and item.lease_owner not in (owner, None)):
            continue
        out.append(_requeue(item, now))
        if reason:
            item.error = f"waiting for a worker that can run it: {reason}"[:2000]
        _hold(item, owner, m.token, now + timedelta(seconds=lease_seconds))
    return out


def _update_unlocked(s: Session, item_ids: Iterable[int], where, values: dict) -> int:
    """UPDATE the rows of ``item_ids`` matching ``where``, skipping rows another transaction has
    locked (a claim or commit, which sets the lease itself): never waits on a worker's
    transaction nor deadlocks with one. Returns the rows updated."""
    n = 0
    for chunk in chunks(sorted(set(item_ids)), CHUNK):
        mine = (select(Item.id).where(Item.id.in_(chunk), *where).order_by(Item.id)
                .with_for_update(skip_locked=True))
        n += s.execute(update(Item).where(Item.id.in_(mine.scalar_subquery())).values(**values)
                       .execution_options(synchronize_session=False)).rowcount
    return n


def end_handoff(s: Session, msgs: Sequence[Message], owner: str) -> int:
    """The follow-up messages are in the broker: drop ``owner``'s handoff leases on them."""
    return _update_unlocked(s, (m.item_id for m in msgs),
                            [Item.lease_owner == owner, or_(Item.lease_token.is_(None), Item.lease_token != Item.token)],
                            {"lease_owner": None, "lease_token": None, "lease_expires_at": None, "lease_alone": False})


def heartbeat(s: Session, item_ids: Iterable[int], owner: str, lease_seconds: float,
              now: datetime | None = None) -> int:
    """Renew ``owner``'s leases on ``item_ids``; returns how many it still holds."""
    expires = (now or utcnow()) + timedelta(seconds=lease_seconds)
    return _update_unlocked(s, item_ids, [Item.lease_owner == owner], {"lease_expires_at": expires})


# --- the rescuer, requeues and the CLI's transitions --------------------------------------------

@dataclass
class Requeued:
    msgs: list[Message] = field(default_factory=list)
    solo: list[Message] = field(default_factory=list)
    failed: int = 0

    def __len__(self) -> int:
        return len(self.msgs) + len(self.solo)


def rescue_expired(s: Session, job_id: int, *, max_attempts: int, now: datetime | None = None) -> Requeued:
    """Requeue the job's items whose lease expired (their worker died or lost the database
    for longer than a lease). Each is rescued once: the lease is cleared here."""
    now = now or utcnow()
    out = Requeued()
    job = lock_job(s, job_id)
    if job.status not in (RUNNING, CANCELLED):
        return out
    q = (select(Item).where(Item.job_id == job_id, Item.lease_owner.is_not(None), Item.lease_expires_at < now,
                            Item.status == PENDING)
         .order_by(Item.id).with_for_update(skip_locked=True).execution_options(populate_existing=True))
    for item in s.scalars(q):
        how = _rescue(item, now, max_attempts)
        if how == "failed":
            out.failed += 1
        elif job.status == CANCELLED:
            _finish_item(item, CANCELLED, now)
        else:
            (out.solo if how == "solo" else out.msgs).append(_requeue(item, now))
    if out.failed:
        finish_job_if_done(s, job, now)
    return out


def _requeue_unleased(s: Session, job_id: int, now: datetime, *where) -> list[Message]:
    """New tokens for the job's pending items nobody holds (rows a worker has locked are
    skipped: they are mid-commit and get a token from it)."""
    rows = s.execute(select(Item.id, Item.round).where(Item.job_id == job_id, Item.status == PENDING,
                                                       Item.lease_owner.is_(None), *where)
                     .order_by(Item.id).with_for_update(skip_locked=True)).all()
    out = []
    for chunk in chunks(rows, CHUNK):
        params = [{"id": i, "token": new_token(), "updated_at": now} for i, _ in chunk]
        s.execute(update(Item), params)  # ORM bulk UPDATE by primary key
        out += [Message(i, r, p["token"]) for (i, r), p in zip(chunk, params)]
    return out


def requeue_lost(s: Session, job_id: int, *, stale_before: datetime, now: datetime | None = None) -> list[Message]:
    """Pending items nobody holds and nothing has touched since ``stale_before``: their message
    was lost (a broker restart). Only for a queue known to be empty, or by hand."""
    now = now or utcnow()
    job = lock_job(s, job_id)
    if job.status != RUNNING:
        return []
    return _requeue_unleased(s, job_id, now, Item.updated_at < stale_before)


def resume(s: Session, job_id: int, *, max_attempts: int, now: datetime | None = None) -> Requeued:
    """``submit --resume``: cancelled items back to pending where they stopped, every pending
    item nobody holds requeued, expired leases rescued; live leases are left to their holders.
    The job runs again, or finishes here if nothing is left."""
    now = now or utcnow()
    job = lock_job(s, job_id)
    s.execute(update(Item).where(Item.job_id == job_id, Item.status == CANCELLED)
              .values(status=PENDING, finished_at=None, updated_at=now, lease_owner=None, lease_token=None,
                      lease_expires_at=None, lease_alone=False)
              .execution_options(synchronize_session=False))
    job.status, job.finished_at = RUNNING, None
    out = rescue_expired(s, job_id, max_attempts=max_attempts, now=now)
    out.msgs += _requeue_unleased(s, job_id, now)
    finish_job_if_done(s, job, now)
    return out


def retry_failed(s: Session, job_id: int, now: datetime | None = None) -> list[Message]:
    """Failed items back to round 0 with their scores removed; the job runs again. Returns
    their messages: send them before this transaction commits, so a broker that is down
    leaves the items failed (and `retry --failed` can be run again)."""
    now = now or utcnow()
    job = lock_job(s, job_id)
    ids = list(s.scalars(select(Item.id).where(Item.job_id == job_id, Item.status == FAILED)
                         .order_by(Item.id).with_for_update()))
    out = []
    for chunk in chunks(ids, CHUNK):
        s.execute(delete(RoundScores).where(RoundScores.item_id.in_(chunk)))
        params = [{"id": i, "token": new_token(), "status": PENDING, "round": 0, "attempts": 0, "rescues": 0,
                   "n_evals": 0, "error": None, "survivors": list(range(job.n_classes)),
                   "n_survivors": job.n_classes, "label": None, "label_idx": None, "confidence": None,
                   "margin": None, "finished_at": None, "updated_at": now, "lease_owner": None,
                   "lease_token": None, "lease_expires_at": None, "lease_alone": False} for i in chunk]
        s.execute(update(Item), params)
        out += [Message(p["id"], 0, p["token"]) for p in params]
    if ids:
        job.status, job.finished_at = RUNNING, None
    return out


@dataclass(frozen=True)
class Cancelled:
    was: str  # the job's status before
    cancelled: int  # items cancelled now
    in_flight: int  # items whose worker holds them: cancelled when their round commits


def cancel(s: Session, job_id: int, now: datetime | None = None) -> Cancelled:
    """Stop a running job. Items nobody holds are cancelled now; an item a worker is scoring
    keeps its lease, and its round is committed and the item cancelled when it ends, so no
    work is thrown away and `submit --resume` goes on from there."""
    now = now or utcnow()
    job = lock_job(s, job_id)
    if job.status != RUNNING:
        return Cancelled(job.status, 0, 0)
    free = or_(Item.lease_owner.is_(None), Item.lease_expires_at < now, Item.lease_token != Item.token)
    n = s.execute(update(Item).where(Item.job_id == job_id, Item.status == PENDING, free)
                  .values(status=CANCELLED, token=None, finished_at=now, updated_at=now, lease_owner=None,
                          lease_token=None, lease_expires_at=None, lease_alone=False)
                  .execution_options(synchronize_session=False)).rowcount
    held = s.scalar(select(func.count()).where(Item.job_id == job_id, Item.status == PENDING)) or 0
    job.status, job.finished_at = JobStatus.CANCELLED.value, now
    return Cancelled(RUNNING, n, held)


# --- helpers --------------------------------------------------------------------------------------

def _insert_scores(s: Session, rows: list[dict[str, Any]]) -> None:
    """A round's rows in one statement; a row already stored (a task run twice) is left as is."""
    if not rows:
        return
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    s.execute(insert(RoundScores).on_conflict_do_nothing(), rows)
