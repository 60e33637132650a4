"""The embedded executor: a job's rounds run in this process, no broker.

Same messages, same ``run_round``, same scheduler as the Celery workers; only the
queue differs (a local deque). Used by ``difflabel submit --local`` and whenever no
broker is configured.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from orchestrator import jobs
from orchestrator.settings import Settings
from worker.round import Runtime, run_round


def run_embedded(settings: Settings, job_id: int, *, device: str | None = None,
                 on_progress: Callable[[int], None] | None = None, runtime: Runtime | None = None,
                 refresh_tokens: bool = True) -> None:
    """Run every pending item of ``job_id`` to the end. ``on_progress(n)``: n items finished.
    ``refresh_tokens=False`` only for a job no queue has seen yet."""
    rt = runtime or Runtime(settings, device=device)
    with rt.sessions.begin() as s:
        msgs = jobs.pending_messages(s, job_id, refresh_tokens=refresh_tokens)
    chunk = settings.items_per_task
    queue = deque(msgs[i : i + chunk] for i in range(0, len(msgs), chunk))
    while queue:
        batch = queue.popleft()
        # Merge small follow-up tasks so model calls stay full.
        while queue and len(batch) + len(queue[0]) <= chunk:
            batch = batch + queue.popleft()
        nexts = run_round(rt, job_id, batch, claim=False).next
        if nexts:
            queue.append(nexts)
        if on_progress:
            on_progress(len(batch) - len(nexts))
