"""Automatic repair: requeue rounds whose messages were lost.

Redis keeps nothing on disk here, so a restart empties the queue; a worker killed outright
leaves its round unacknowledged until the visibility timeout (and a task that had gone on to
later rounds leaves a message that is already stale). Postgres still knows every unfinished
item, so each worker runs ``sweep`` every ``DIFFLABEL_REPAIR_INTERVAL`` seconds. With
``DIFFLABEL_STALE_AFTER`` seconds as the limit:

* an item whose round started that long ago and never ended was abandoned by its worker;
* when the queue is empty, an item nothing has touched for that long cannot be waiting in
  the queue or running (a round start touches the item): its message was lost.

Either gets a new token and a new message; a message that turns up later with the old
token is dropped. One worker sweeps a queue at a time (an advisory lock).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import select, text

from orchestrator import db, jobs
from orchestrator.schema import Job, JobStatus, utcnow
from orchestrator.settings import Settings

log = logging.getLogger("difflabel.repair")


def queue_size(app, queue: str) -> int:
    """Messages waiting in ``queue`` on the Redis broker."""
    with app.connection_for_read() as conn:
        return int(conn.default_channel.client.llen(queue))


def sweep(app, settings: Settings) -> int:
    """Requeue the lost items of this queue's running jobs; returns how many."""
    from worker.celery_app import send_rounds

    # While the queue holds messages, untouched items may be waiting in it for hours.
    queue_empty = queue_size(app, settings.queue) == 0
    cutoff = utcnow() - timedelta(seconds=settings.stale_after)
    found: dict[int, list] = {}
    with db.sessions(settings.database_url).begin() as s:
        if s.get_bind().dialect.name == "postgresql" and not s.execute(
                text("select pg_try_advisory_xact_lock(hashtext(:k))"),
                {"k": f"difflabel-repair:{settings.queue}"}).scalar():
            return 0  # another worker is sweeping this queue
        running = s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value,
                                                 Job.queue == settings.queue))
        for job_id in list(running):
            if queue_empty:
                msgs = jobs.pending_messages(s, job_id, stale_before=cutoff, refresh_tokens=True)
            else:
                msgs = jobs.pending_messages(s, job_id, abandoned_before=cutoff, refresh_tokens=True)
            if msgs:
                found[job_id] = msgs
    for job_id, msgs in found.items():
        log.warning("job %s: %d items had no live round task; requeued", job_id, len(msgs))
        send_rounds(app, settings, job_id, msgs)
    return sum(len(m) for m in found.values())


def start(app, settings: Settings) -> threading.Thread | None:
    """Sweep every ``settings.repair_interval`` seconds in a daemon thread (0: never)."""
    if settings.repair_interval <= 0:
        return None

    def loop() -> None:
        while True:
            time.sleep(settings.repair_interval)
            try:
                sweep(app, settings)
            except Exception as e:  # noqa: BLE001 - Redis or Postgres away: try again later
                log.warning("repair sweep skipped: %s: %s", type(e).__name__, str(e).splitlines()[0][:200]
                            if str(e) else "")

    t = threading.Thread(target=loop, name="difflabel-repair", daemon=True)
    t.start()
    return t
