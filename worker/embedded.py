"""The embedded executor: a job's rounds run in this process, no broker.

The same ``worker.driver.run_task`` as the Celery workers, one round per task; only the
queue differs (a local deque, whose small follow-up tasks are merged so model calls stay
full). It takes no leases: nothing else works on an embedded job while it runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from orchestrator.settings import Settings
from worker.backoff import Backoff
from worker.driver import run_task
from worker.messages import Message, RoundTask, chunks
from worker.round import Runtime


def run_embedded(settings: Settings, job_id: int, msgs: Sequence[Message], *,
                 on_progress: Callable[[int], None] | None = None, runtime: Runtime | None = None) -> None:
    """Run ``msgs`` (and every round after them) to the end. ``on_progress(n)``: n items finished."""
    rt = runtime or Runtime(settings, leases=False)
    chunk = rt.job(job_id).per_task
    queue: deque[RoundTask] = deque(RoundTask(job_id, g) for g in chunks(list(msgs), chunk))
    while queue:
        batch = list(queue.popleft().items)
        while queue and len(batch) + len(queue[0].items) <= chunk:  # merge small follow-ups
            batch += queue.popleft().items
        # One worker-side failure (the model will not load here, S3 out of reach) ends the run
        # with its reason; the items wait, uncharged, for `submit --resume`.
        n = run_task(rt, RoundTask(job_id, tuple(batch)), queue.append, seconds=0.0, claim=False,
                     backoff=Backoff(1))
        if on_progress:
            on_progress(n)
