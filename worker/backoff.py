"""Worker policy: back off after a worker-side failure, stop after too many in a row.

A worker-side failure is one that says nothing about the items: the model or the device
will not load on this worker, or S3 or the database cannot be reached from it. Its items
have already gone back to the queue uncharged (``lifecycle.release``), so another worker
can take them at once; this worker waits before its next task, doubling the wait each time,
and after ``limit`` failures in a row it stops consuming and exits non-zero with one line
saying why, so a supervisor restarts it or alerts. Any round that succeeds resets the count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.errors import WorkerBroken

log = logging.getLogger("difflabel.worker")

#: First wait after a worker-side failure, in seconds (doubled after each further one).
DEFAULT_MIN_BACKOFF = 1.0
#: Longest wait between tries, in seconds.
DEFAULT_MAX_BACKOFF = 30.0


class Backoff:
    """Consecutive worker-side failures of one worker process."""

    def __init__(self, limit: int, min_backoff: float = DEFAULT_MIN_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF, sleep: Callable[[float], None] = time.sleep):
        self.limit, self.min, self.max, self.sleep = max(1, limit), min_backoff, max_backoff, sleep
        self.failures = 0
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0

    def failed(self, reason: str) -> None:
        """Count a failure; raise WorkerBroken at the limit, else sleep the backoff."""
        with self._lock:
            self.failures += 1
            n = self.failures
        if n >= self.limit:
            raise WorkerBroken(reason if self.limit == 1 else f"{n} worker-side failures in a row, last: {reason}")
        wait = min(self.max, self.min * 2 ** (n - 1))
        log.warning("worker-side failure %d of %d (%s); items given back, next task in %.0f s",
                    n, self.limit, reason, wait)
        self.sleep(wait)
