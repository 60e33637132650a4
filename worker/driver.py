"""The round loop every job executor shares (Celery task and embedded).

``run_task`` runs a task's rounds: it goes straight on to its items' next rounds (each
committed as it ends, so a crash loses at most one round) until ``seconds`` have passed, then
sends the survivors as follow-up tasks. Every message it sends goes through ``send``: the
broker for a worker, a local queue for the embedded executor. Retries travel the same way,
never inline: a failed item is retried by whichever worker takes its new message.

Failures by cause: an item at fault is charged by ``lifecycle.commit``; a worker-side failure
(model, device, S3) releases the items uncharged and the worker backs off (``Backoff``); an
unreachable database hands the items on by name (``RoundTask.handoff_from``) so the next
worker can take over this worker's live leases; an unexpected error counts an attempt for the
task's items (the one catch-all).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator import lifecycle
from worker.backoff import Backoff
from worker.errors import ServiceUnavailableError, WorkerBroken, first_line as _line
from worker.messages import Message, RoundTask, chunks
from worker.round import Runtime, fail_all, run_round

log = logging.getLogger("difflabel.worker")

Send = Callable[[RoundTask], None]
DATABASE_DOWN = (OperationalError, InterfaceError)


def run_task(rt: Runtime, task: RoundTask, send: Send, *, seconds: float, backoff: Backoff | None = None,
             claim: bool = True) -> int:
    """Run ``task``; returns the number of its items that finished here."""
    deadline = time.monotonic() + seconds
    msgs: Sequence[Message] = task.items
    known, first, done = None, True, 0
    try:
        while msgs:
            go_on = time.monotonic() < deadline
            try:
                out = run_round(rt, RoundTask(task.job_id, tuple(msgs), task.handoff_from if first else None),
                                claim=claim and first, go_on=go_on, known=known)
            except DATABASE_DOWN as e:
                reason = f"database unreachable ({type(e).__name__}: {_line(e)})"
                log.warning("job %s: %s; handing %d items on", task.job_id, reason, len(msgs))
                send(RoundTask(task.job_id, tuple(msgs), rt.owner))
                rt.drop(m.item_id for m in msgs)
                if backoff:
                    backoff.failed(reason)
                return done
            done += out.finished
            per_task = rt.per_task(task.job_id)  # the round loaded the job: no database read
            sent = _emit(send, task.job_id, out.send, per_task) + _emit(send, task.job_id, out.solo, 1) + \
                _emit(send, task.job_id, out.released, per_task)
            if not go_on or out.worker_error:
                sent += _emit(send, task.job_id, out.next, per_task)
            _end_handoff(rt, sent)
            if out.worker_error:
                if backoff:
                    backoff.failed(out.worker_error)
                return done
            if backoff:
                backoff.succeeded()
            if not go_on:
                break
            msgs, known, first = out.next, out.items, False
    except (WorkerBroken, ServiceUnavailableError, *DATABASE_DOWN):
        raise  # the task boundary decides: stop the worker, or back off
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: count it, move on
        log.exception("job %s: round task failed", task.job_id)
        retry = fail_all(rt, RoundTask(task.job_id, tuple(msgs)), f"{type(e).__name__}: {_line(e)}")
        _end_handoff(rt, _emit(send, task.job_id, retry, rt.per_task(task.job_id)))
    return done


def _emit(send: Send, job_id: int, msgs: Sequence[Message], per_task: int) -> list[Message]:
    for group in chunks(msgs, per_task):
        send(RoundTask(job_id, group))
    return list(msgs)


def _end_handoff(rt: Runtime, sent: list[Message]) -> None:
    """The messages are out: drop the handoff leases on them (best effort: an expired
    handoff lease is rescued uncharged anyway)."""
    if not sent:
        return
    rt.drop(m.item_id for m in sent)
    if rt.owner is None:
        return
    try:
        with rt.sessions.begin() as s:
            lifecycle.end_handoff(s, sent, rt.owner)
    except DATABASE_DOWN as e:
        log.warning("could not end %d handoffs (%s); their leases lapse instead", len(sent), type(e).__name__)
