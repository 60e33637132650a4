"""Worker policy: the rescuer. Requeue what no live worker holds and no message carries.

Every worker runs ``sweep`` every ``DIFFLABEL_REPAIR_INTERVAL`` seconds for the queues it
consumes (one worker per queue at a time, by advisory lock):

* **expired leases**: an item whose holder stopped renewing its lease (the worker died, or lost
  the database for longer than a lease) is rescued by ``lifecycle.rescue_expired``: charged
  only if the holder had it alone, sent alone next otherwise;
* **lost messages**: Redis keeps nothing on disk here, so a restart empties the queue. When
  the queue is empty, a pending item that nobody holds and nothing has touched for
  ``DIFFLABEL_STALE_AFTER`` seconds cannot be waiting in it: it gets a new token and message.

Each requeue clears the lease and touches the item, so the next sweep does not requeue it
again. Messages are sent before the transaction commits: a broker that is down rolls the
requeue back, and the next sweep tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select, text

from orchestrator import db, jobs, lifecycle
from orchestrator.schema import Item, ItemStatus, Job, JobStatus, utcnow
from orchestrator.settings import Settings
from worker.broker import queue_size, send_rounds
from worker.errors import first_line

log = logging.getLogger("difflabel.repair")


def sweep(app, settings: Settings, queues: Sequence[str] | None = None) -> int:
    """Requeue the rescued and lost items of these queues' jobs; returns how many."""
    return sum(_sweep_queue(app, settings, q) for q in (queues or (settings.queue,)))


def _sweep_queue(app, settings: Settings, queue: str) -> int:
    queue_empty = queue_size(app, queue) == 0  # while it holds messages, untouched items may wait in it
    now = utcnow()
    total = 0
    with db.sessions(settings.database_url).begin() as s:
        if s.get_bind().dialect.name == "postgresql" and not s.execute(
                text("select pg_try_advisory_xact_lock(hashtext(:k))"), {"k": f"difflabel-repair:{queue}"}).scalar():
            return 0  # another worker is sweeping this queue
        expired = s.scalars(
            select(Item.job_id).distinct().join(Job, Job.id == Item.job_id)
            .where(Job.queue == queue, Job.status.in_([JobStatus.RUNNING.value, JobStatus.CANCELLED.value]),
                   Item.lease_owner.is_not(None), Item.lease_expires_at < now,
                   Item.status == ItemStatus.PENDING.value)).all()
        for job_id in sorted(expired):
            r = lifecycle.rescue_expired(s, job_id, max_attempts=settings.max_attempts, now=now)
            if len(r) or r.failed:
                log.warning("job %s: %d items whose worker stopped renewing its lease; requeued (%d alone)%s",
                            job_id, len(r), len(r.solo), f", {r.failed} failed" if r.failed else "")
            per_task = jobs.items_per_task(s.get(Job, job_id), settings.items_per_task, settings.task_evals)
            send_rounds(app, settings, job_id, r.msgs, chunk=per_task, queue=queue)
            send_rounds(app, settings, job_id, r.solo, chunk=1, queue=queue)
            total += len(r)
        if queue_empty:
            running = s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value, Job.queue == queue)).all()
            stale_before = now - timedelta(seconds=settings.stale_after)
            for job_id in sorted(running):
                msgs = lifecycle.requeue_lost(s, job_id, stale_before=stale_before, now=now)
                if msgs:
                    log.warning("job %s: %d items had no live round task; requeued", job_id, len(msgs))
                    per_task = jobs.items_per_task(s.get(Job, job_id), settings.items_per_task,
                                                   settings.task_evals)
                    send_rounds(app, settings, job_id, msgs, chunk=per_task, queue=queue)
                    total += len(msgs)
    return total


def start(app, settings: Settings, queues: Sequence[str] | None = None) -> threading.Thread | None:
    """Sweep every ``settings.repair_interval`` seconds in a daemon thread (0: never)."""
    if settings.repair_interval <= 0:
        return None

    def loop() -> None:
        while True:
            time.sleep(settings.repair_interval)
            try:
                sweep(app, settings, queues)
            except Exception as e:  # noqa: BLE001 - Redis or Postgres away: try again later
                log.warning("repair sweep skipped: %s: %s", type(e).__name__, first_line(e, 200))

    t = threading.Thread(target=loop, name="difflabel-repair", daemon=True)
    t.start()
    return t
