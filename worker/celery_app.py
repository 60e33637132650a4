"""The Celery app and its one task, configured for long GPU rounds on a Redis broker.

Reliability settings (Celery's documentation and its users' reports):
* acks_late + reject_on_worker_lost: a round whose worker dies is redelivered;
* worker_prefetch_multiplier = 1: a worker holds one round at a time;
* results ignored: job state lives in the database;
* Redis visibility_timeout set explicitly, far above a round's duration;
* no ETA/countdown tasks and no chords: a round's own completion queues the next;
* monitoring events on (Flower shows the workers and their tasks; see worker.events).

The task is a thin shell over ``worker.driver.run_task``. This module imports no torch at
import time: the orchestrator uses ``send_rounds`` to enqueue.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import lru_cache

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

from orchestrator.settings import Settings
from worker.broker import ROUND_TASK, check_broker, send_rounds, send_tasks  # noqa: F401 - re-exported
from worker.errors import ServiceUnavailableError, first_line
from worker.messages import RoundTask

log = logging.getLogger("difflabel.worker")

#: Exit status of a worker that stopped after too many worker-side failures in a row
#: (EX_TEMPFAIL: a supervisor may restart it once the model, device or service is fixed).
EXIT_WORKER_BROKEN = 75


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
        # Monitoring events, so Flower shows the workers and their round tasks: Redis PUBLISHes
        # that nothing stores. A worker's round task (up to DIFFLABEL_TASK_SECONDS) costs 3
        # (received, started, succeeded), plus task-sent for each follow-up it queues
        # (_sent_events_in_workers). Not for the CLI's bulk queueing: one more publish per task
        # there took 2,000 tasks from 4.2 to 7.9 s (2-core machine, local Redis).
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    app.task(name=ROUND_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True)(round_task)
    return app


def round_task(self, job_id: int, messages: list[list], handoff_from: str | None = None, **old) -> int:
    """Thin shell: decode, run the task's rounds, stop the worker if it cannot work."""
    from worker.driver import DATABASE_DOWN, run_task
    from worker.errors import WorkerBroken
    from worker.memory import release_memory

    rt, backoff = runtime(), _backoff()
    task = RoundTask.decode(job_id, messages, handoff_from, **old)
    try:
        return run_task(rt, task, _sender(self.app, rt), seconds=rt.settings.task_seconds, backoff=backoff)
    except WorkerBroken as e:
        _stop(str(e))
    except (ServiceUnavailableError, *DATABASE_DOWN) as e:  # the broker or the database went away
        log.error("job %s: %s: %s", job_id, type(e).__name__, first_line(e))
        try:
            backoff.failed(f"{type(e).__name__}: {first_line(e, 200)}")
        except WorkerBroken as e2:
            _stop(str(e2))
    finally:
        rt.drop_all()  # one task at a time (solo pool): nothing outlives it
        release_memory()
    return 0


def _stop(reason: str) -> None:
    """Stop consuming and exit non-zero with one line saying why. The task's items were
    already given back; its unacknowledged message is obsolete and dropped when redelivered."""
    msg = f"error: difflabel worker stopping: {reason}"
    log.critical(msg)
    logging.shutdown()
    # Celery turns sys.stderr into a logger; the line goes to the process's real stderr.
    os.write(2, (msg + "\n").encode("utf-8", "replace"))
    os._exit(EXIT_WORKER_BROKEN)


def _sender(app: Celery, rt):
    def send(task: RoundTask) -> None:
        send_tasks(app, rt.settings, rt.queue_of(task.job_id), [task])
    return send


_RUNTIME = None
_BACKOFF = None
#: Settings of this worker process, set by `difflabel worker` before it starts consuming.
_SETTINGS: Settings | None = None
#: Every queue this worker consumes (the repair sweeps the jobs of each).
_QUEUES: tuple[str, ...] = ()


def configure(settings: Settings, queues: Sequence[str]) -> None:
    """Hand this process's settings to the task (solo pool: the task runs in this process)."""
    global _SETTINGS, _QUEUES
    _SETTINGS, _QUEUES = settings, tuple(queues)


def runtime():
    """The process's Runtime, created on first use (CUDA initialised in this process only)."""
    global _RUNTIME
    if _RUNTIME is None:
        from worker.round import Runtime

        _RUNTIME = Runtime(_SETTINGS or Settings.from_env())
    return _RUNTIME


def _backoff():
    global _BACKOFF
    if _BACKOFF is None:
        from worker.backoff import Backoff

        _BACKOFF = Backoff(runtime().settings.max_worker_failures)
    return _BACKOFF


@worker_process_init.connect
def _init_torch(**_):  # pragma: no cover - runs in prefork children only
    from worker.torch_setup import configure as configure_torch

    configure_torch()


@lru_cache(maxsize=4)
def app_for(settings: Settings) -> Celery:
    return make_app(settings)


# `celery -A worker.celery_app worker` finds this.
app = app_for(Settings.from_env())


@worker_init.connect
def _sent_events_in_workers(sender=None, **_):  # pragma: no cover - runs in worker processes
    """A worker queues follow-ups one task at a time, after rounds that take far longer than
    the extra publish: Flower shows them as queued (task-sent) too."""
    if sender is not None:
        sender.app.conf.task_send_sent_event = True


@worker_ready.connect
def _start_threads(sender=None, **_):  # pragma: no cover - runs in worker processes
    from worker import events, heartbeat, repair

    rt = runtime()
    hostname = getattr(sender, "hostname", None)
    rt.tally.node = hostname
    heartbeat.start(rt)
    if hostname:
        events.start(sender.app, hostname)
    repair.start(sender.app if sender is not None else app, rt.settings, _QUEUES or (rt.settings.queue,))
