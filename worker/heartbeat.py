"""Worker policy: renew the leases this process holds, independently of its model calls.

A thread renews every held lease each third of ``lease_seconds``, so a round that runs for
many minutes (hundreds of labels on a large model) keeps its items, while a worker that dies
stops renewing and its items are rescued once the lease runs out (``worker.repair``).
"""

from __future__ import annotations

import logging
import threading

from orchestrator import fleet, lifecycle
from worker.errors import first_line

log = logging.getLogger("difflabel.heartbeat")


def beat(rt) -> int:
    """Renew ``rt``'s leases once; returns how many it still holds."""
    ids = rt.held()
    if not ids or rt.owner is None:
        return 0
    with rt.sessions.begin() as s:
        n = lifecycle.heartbeat(s, ids, rt.owner, rt.settings.lease_seconds)
        tally = getattr(rt, "tally", None)
        if n and tally is not None and tally.current is not None:  # busy in a long round: still here
            fleet.touch(s, rt.owner, [tally.current])
    return n


def start(rt) -> threading.Thread:
    interval = max(0.2, rt.settings.lease_seconds / 3)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                beat(rt)
            except Exception as e:  # noqa: BLE001 - the database is away: leases may lapse, work is kept
                log.warning("heartbeat skipped: %s: %s", type(e).__name__, first_line(e, 200))

    t = threading.Thread(target=loop, name="difflabel-heartbeat", daemon=True)
    t.stop = stop  # type: ignore[attr-defined]
    t.start()
    return t
