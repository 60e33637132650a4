"""The Celery app and its one task, configured for long GPU rounds on a Redis broker.

Reliability settings (Celery's documentation and its users' reports):
* acks_late + reject_on_worker_lost: a round whose worker dies is redelivered;
* worker_prefetch_multiplier = 1: a worker holds one round at a time;
* results ignored: job state lives in the database;
* Redis visibility_timeout set explicitly, far above a round's duration;
* no ETA/countdown tasks and no chords: a round's own completion queues the next.

This module imports no torch: the orchestrator uses ``send_rounds`` to enqueue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from orchestrator.settings import Settings, redact
from worker.errors import ServiceUnavailableError

log = logging.getLogger("difflabel.worker")

ROUND_TASK = "difflabel.round"


def make_app(settings: Settings) -> Celery:
    app = Celery("difflabel", broker=settings.broker_url or "redis://127.0.0.1:6379/0")
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    app.task(name=ROUND_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True)(round_task)
    return app


#: How long a round task keeps retrying while the database is unreachable, in seconds.
INFRA_RETRY_SECONDS = 60.0


def round_task(self, job_id: int, messages: list[list], reclaim: bool = False) -> int:
    """Thin shell: parse, run rounds, enqueue what comes next. Returns items processed.

    The task goes straight on to its items' next rounds (each committed as it ends) until
    it has run ``DIFFLABEL_TASK_SECONDS``; then the survivors are queued as a new task.
    An unreachable database is not the items' fault: a round is retried here with backoff;
    if the outage outlasts INFRA_RETRY_SECONDS the same messages are sent again as a new
    task (no ETA), so nothing waits for a repair. Any other error counts a failed attempt
    for the task's items (the one catch-all, at this boundary).
    """
    import time

    from orchestrator.jobs import Message

    rt = runtime()
    msgs = [Message.from_list(m) for m in messages]
    deadline = time.monotonic() + rt.settings.task_seconds
    solo, claim, done, known = [], True, 0, None
    while msgs:
        go_on = time.monotonic() < deadline
        out = _one_round(self, rt, job_id, msgs, claim=claim, reclaim=reclaim, keep_started=go_on, known=known)
        if out is None:  # handed back to the queue
            break
        solo += out.solo
        done += len(msgs) - len(out.next)
        msgs, claim, reclaim, known = out.next, False, False, out.items
        if not go_on:
            send_rounds(self.app, rt.settings, job_id, msgs)
            break
    send_rounds(self.app, rt.settings, job_id, solo, chunk=1)
    _release_memory()
    return done


def _release_memory() -> None:
    """Hand freed heap pages back to the OS after each task. Every round allocates tensors
    of a different size; glibc keeps the freed space in its arenas, so a long-running worker's
    resident memory would creep up job after job (bench/memory.py) without this."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _one_round(task, rt, job_id: int, msgs: list, **kw):
    """``run_round`` with the database-outage retries and the catch-all; None when the
    messages were sent back to the queue instead."""
    import time

    from sqlalchemy.exc import OperationalError

    from worker.errors import RetryableError
    from worker.round import fail_all, run_round

    delay, deadline = 1.0, time.monotonic() + INFRA_RETRY_SECONDS
    while True:
        try:
            return run_round(rt, job_id, msgs, **kw)
        except (OperationalError, RetryableError) as e:
            # This task may have claimed the items before the outage: they are its own.
            kw.update(claim=True, reclaim=True)
            if time.monotonic() + delay > deadline:
                log.error("job %s: database unavailable for %.0f s (%s); requeueing %d items",
                          job_id, INFRA_RETRY_SECONDS, type(e).__name__, len(msgs))
                send_rounds(task.app, rt.settings, job_id, msgs, reclaim=True)
                return None
            log.warning("job %s: database unavailable (%s); retrying in %.0f s", job_id,
                        type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: count it, move on
            log.exception("job %s: round task failed", job_id)
            retry = fail_all(rt, job_id, msgs, f"{type(e).__name__}: {str(e).strip()[:300]}")
            send_rounds(task.app, rt.settings, job_id, retry)
            return None


_RUNTIME = None


def runtime():
    """The process's Runtime, created on first use (CUDA initialised in this process only)."""
    global _RUNTIME
    if _RUNTIME is None:
        import os

        from worker.round import Runtime

        _RUNTIME = Runtime(Settings.from_env(), device=os.environ.get("DIFFLABEL_DEVICE") or None)
    return _RUNTIME


@worker_process_init.connect
def _init_torch(**_):  # pragma: no cover - runs in prefork children only
    from worker.torch_setup import configure

    configure()


def send_rounds(app: Celery, settings: Settings, job_id: int, messages: Sequence, chunk: int | None = None,
                reclaim: bool = False) -> int:
    """Enqueue messages as round tasks of ``settings.items_per_task`` items. Returns tasks sent."""
    if not messages:
        return 0
    chunk = chunk or settings.items_per_task
    payload = [m.to_list() for m in messages]
    kwargs = {"reclaim": True} if reclaim else None
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for i in range(0, len(payload), chunk):
                app.send_task(ROUND_TASK, args=[job_id, payload[i : i + chunk]], kwargs=kwargs,
                              queue=settings.queue, producer=producer)
                sent += 1
    except Exception as e:  # noqa: BLE001 - kombu raises many connection error types
        raise ServiceUnavailableError(f"broker {redact(settings.broker_url)} is unreachable: "
                                      f"{type(e).__name__}") from e
    return sent


def check_broker(app: Celery, settings: Settings) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as e:  # noqa: BLE001
        raise ServiceUnavailableError(f"broker {redact(settings.broker_url)} is unreachable: "
                                      f"{type(e).__name__}") from e


@lru_cache(maxsize=4)
def app_for(settings: Settings) -> Celery:
    return make_app(settings)


# `celery -A worker.celery_app worker` finds this.
app = app_for(Settings.from_env())


@worker_ready.connect
def _start_repair(sender=None, **_):  # pragma: no cover - runs in worker processes
    from worker import repair

    repair.start(sender.app if sender is not None else app, runtime().settings)
