"""Worker policy: keep Flower's view of a busy worker alive while a round task runs.

Workers send Celery's monitoring events (``worker.celery_app``: task events on), so Flower
shows them and their round tasks. Celery sends a worker's ``worker-heartbeat`` every 2 s
from the thread that also runs tasks in the solo pool, so during a round task (up to
``DIFFLABEL_TASK_SECONDS``, 30, or one long round of many labels) the worker falls silent
and Flower, which expects a heartbeat every 2 s, shows it offline. This thread sends the
same event on a connection of its own while a task runs; between tasks Celery's own
heartbeat does. One small publish every 2 s per busy worker.
"""

from __future__ import annotations

import logging
import threading

from worker.errors import first_line

log = logging.getLogger("difflabel.events")

#: Seconds between heartbeats: Celery's own default (Flower calls a worker offline after
#: two missed ones).
HEARTBEAT_INTERVAL = 2.0


def start(app, hostname: str, interval: float = HEARTBEAT_INTERVAL) -> threading.Thread:
    from celery.utils.sysinfo import load_average
    from celery.worker import state

    stop = threading.Event()

    def loop() -> None:
        conn = dispatcher = None
        while not stop.wait(interval):
            if not state.active_requests:
                continue  # idle: Celery's own heartbeat runs
            try:
                if dispatcher is None:
                    conn = app.connection_for_write()
                    dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True)
                dispatcher.send("worker-heartbeat", freq=interval, active=len(state.active_requests),
                                processed=state.all_total_count[0], loadavg=load_average(),
                                **state.SOFTWARE_INFO)
            except Exception as e:  # noqa: BLE001 - the broker is away: try again next beat
                log.debug("worker heartbeat event not sent: %s: %s", type(e).__name__, first_line(e, 200))
                for closable in (dispatcher, conn):
                    try:
                        if closable is not None:
                            closable.close()
                    except Exception:  # noqa: BLE001
                        pass
                conn = dispatcher = None

    t = threading.Thread(target=loop, name="difflabel-events", daemon=True)
    t.stop = stop  # type: ignore[attr-defined]
    t.start()
    return t
