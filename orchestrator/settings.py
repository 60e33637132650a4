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
#: A round task goes straight on to its items' next rounds until it has run this long (s):
#: no broker round trip, no state rebuild between them. 0: one round per task.
DEFAULT_TASK_SECONDS = 30.0
#: An unfinished item untouched for this long (s) is considered lost by `repair`, and a
#: round start older than this whose worker never finished it is taken as a worker death.
DEFAULT_STALE_AFTER = 900
#: Seconds between a worker's automatic repair sweeps (0: off); see worker.repair.
DEFAULT_REPAIR_INTERVAL = 60


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str | None = None
    queue: str = DEFAULT_QUEUE
    s3_endpoint_url: str | None = None
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    items_per_task: int = DEFAULT_ITEMS_PER_TASK
    stale_after: int = DEFAULT_STALE_AFTER
    repair_interval: float = DEFAULT_REPAIR_INTERVAL
    task_seconds: float = DEFAULT_TASK_SECONDS

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
            stale_after=int(env.get("DIFFLABEL_STALE_AFTER", DEFAULT_STALE_AFTER)),
            repair_interval=float(env.get("DIFFLABEL_REPAIR_INTERVAL", DEFAULT_REPAIR_INTERVAL)),
            task_seconds=float(env.get("DIFFLABEL_TASK_SECONDS", DEFAULT_TASK_SECONDS)),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


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
