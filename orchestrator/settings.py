"""Infrastructure settings: one frozen object read from the environment.

Precedence: command-line option > environment (DIFFLABEL_*) > the defaults below.
Scoring parameters are not here: they are per job (worker.config.ScoringConfig).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

#: Embedded default store: a SQLite file in the user's data folder.
DEFAULT_DATABASE_URL = f"sqlite:///{Path.home() / '.difflabel' / 'difflabel.db'}"
#: Celery queue that round tasks go to.
DEFAULT_QUEUE = "difflabel"
#: Redis visibility timeout (s): an unacknowledged round task is redelivered after this.
#: Far above a round's duration (seconds to a minute), so a slow round is never run twice.
DEFAULT_VISIBILITY_TIMEOUT = 3600
#: A failing item is retried this many times before it is marked failed.
DEFAULT_MAX_ATTEMPTS = 3
#: Items per round task; their (item, class, sample) triples share model calls, so more
#: items keep batches full once few classes survive (64 x 10 classes x 5 samples = 3,200 rows).
DEFAULT_ITEMS_PER_TASK = 64
#: ...but fewer when a task's first round would exceed this many model evaluations: at 1,000
#: labels a first round is 1,000 (pooled rule) to 5,000 (t-test) evaluations per item, so a
#: task of 64 items would run for minutes; with this budget it holds 3 to 16.
DEFAULT_TASK_EVALS = 16384
#: A round task goes straight on to its items' next rounds until it has run this long (s):
#: no broker round trip, no state rebuild between them. 0: one round per task.
DEFAULT_TASK_SECONDS = 30.0
#: An unfinished item untouched for this long (s) is considered lost by `repair`, and a
#: round start older than this whose worker never finished it is taken as a worker death.
DEFAULT_STALE_AFTER = 900
#: Seconds between a worker's automatic repair sweeps (0: off); see worker.repair.
DEFAULT_REPAIR_INTERVAL = 60
#: A worker's lease on the items it scores lasts this long (s) unless its heartbeat (every
#: third of it) renews it. Only an expired lease is rescued, so a dead worker's items wait
#: at most this long plus one repair interval; a live worker keeps them however long its
#: model calls take.
DEFAULT_LEASE_SECONDS = 60.0
#: Worker-side failures in a row (model or device will not load, S3 or the database
#: unreachable) after which a worker stops consuming and exits non-zero.
DEFAULT_MAX_WORKER_FAILURES = 5


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str | None = None
    queue: str = DEFAULT_QUEUE
    s3_endpoint_url: str | None = None
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    items_per_task: int = DEFAULT_ITEMS_PER_TASK
    task_evals: int = DEFAULT_TASK_EVALS
    stale_after: int = DEFAULT_STALE_AFTER
    repair_interval: float = DEFAULT_REPAIR_INTERVAL
    task_seconds: float = DEFAULT_TASK_SECONDS
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_worker_failures: int = DEFAULT_MAX_WORKER_FAILURES
    #: The worker's device (cpu, cuda, cuda:N; None: cuda when available).
    device: str | None = None
    #: Model dtype and torch.compile mode for workers (None: the engine's defaults).
    dtype: str | None = None
    compile: str | None = None
    #: Largest image accepted, in pixels (None: worker.images.DEFAULT_MAX_IMAGE_PIXELS).
    max_image_pixels: int | None = None
    #: A ceiling on rows per model call on this machine's device (None: none until out of memory).
    max_batch: int | None = None

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        values = dict(
            database_url=env.get("DIFFLABEL_DATABASE_URL", DEFAULT_DATABASE_URL),
            broker_url=env.get("DIFFLABEL_BROKER_URL") or None,
            queue=env.get("DIFFLABEL_QUEUE", DEFAULT_QUEUE),
            s3_endpoint_url=env.get("DIFFLABEL_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
            visibility_timeout=int(env.get("DIFFLABEL_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT)),
            max_attempts=int(env.get("DIFFLABEL_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)),
            items_per_task=int(env.get("DIFFLABEL_ITEMS_PER_TASK", DEFAULT_ITEMS_PER_TASK)),
            task_evals=int(env.get("DIFFLABEL_TASK_EVALS", DEFAULT_TASK_EVALS)),
            stale_after=int(env.get("DIFFLABEL_STALE_AFTER", DEFAULT_STALE_AFTER)),
            repair_interval=float(env.get("DIFFLABEL_REPAIR_INTERVAL", DEFAULT_REPAIR_INTERVAL)),
            task_seconds=float(env.get("DIFFLABEL_TASK_SECONDS", DEFAULT_TASK_SECONDS)),
            lease_seconds=float(env.get("DIFFLABEL_LEASE_SECONDS", DEFAULT_LEASE_SECONDS)),
            max_worker_failures=int(env.get("DIFFLABEL_MAX_WORKER_FAILURES", DEFAULT_MAX_WORKER_FAILURES)),
            device=env.get("DIFFLABEL_DEVICE") or None,
            dtype=env.get("DIFFLABEL_DTYPE") or None,
            compile=env.get("DIFFLABEL_COMPILE") or None,
            max_image_pixels=_int_or_none(env.get("DIFFLABEL_MAX_IMAGE_PIXELS")),
            max_batch=_int_or_none(env.get("DIFFLABEL_MAX_BATCH")),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _int_or_none(raw: str | None) -> int | None:
    raw = (raw or "").strip()
    return int(raw) if raw else None


def redact(url: str | None) -> str:
    """A URL with any password replaced, safe for messages and logs."""
    if not url:
        return str(url)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
