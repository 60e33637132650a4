"""Batch sizes per device: as large as the job asks, halved on out-of-memory, remembered.

A job asks for ``ScoringConfig.batch_size`` rows per model call; the device decides how
many it can take. The first time a call runs out of memory the ceiling halves and the same
rows are tried again in smaller calls; the ceiling is kept on the backend, so later rounds
start at a size that fits. Splitting rows across calls changes no result: every row's error
depends only on its own (item, class, sample).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("difflabel.worker")



@dataclass
class BatchSizer:
    """The largest batch this device is known to take; ``None`` until something failed."""

    limit: int | None = None

    def size(self, requested: int) -> int:
        return requested if self.limit is None else max(1, min(requested, self.limit))

    def shrink(self, failed: int) -> int:
        """A call of ``failed`` rows ran out of memory: halve the ceiling and return it."""
        self.limit = max(1, failed // 2)
        log.warning("out of memory at %d rows per model call; using %d from now on", failed, self.limit)
        return self.limit


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_batches(n_rows: int, requested: int, sizer: BatchSizer, step: Callable[[slice], None]) -> None:
    """Call ``step(rows)`` on consecutive slices covering ``range(n_rows)``.

    Slices have up to ``sizer.size(requested)`` rows; on ``torch.OutOfMemoryError`` the
    sizer halves and the same rows are retried. A single row that does not fit re-raises.
    ``step`` must write its results only after its model call succeeded (a retried slice
    is then written once).
    """
    start = 0
    while start < n_rows:
        stop = min(start + sizer.size(requested), n_rows)
        try:
            step(slice(start, stop))
        except torch.OutOfMemoryError:
            if stop - start <= 1:
                raise
            oom = True
        else:
            oom = False
        if oom:  # outside the except block: the traceback no longer pins the failed tensors
            sizer.shrink(stop - start)
            _free_cached_memory()
            continue
        start = stop
