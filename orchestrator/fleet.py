"""What each worker did on each job (``job_workers``), written by the workers, read by `status`.

A worker process owns its rows (one per job it has worked on, keyed by its lease holder
name) and adds to them in the transaction of each round it commits: one small upsert per
round, which no other process contends for, and totals that match the items it finished
exactly. The recent rate needs no history table: the worker also writes its totals as they
were about ``WINDOW`` seconds back (``win_*``, kept in its memory), so `status` reads one
row per worker and divides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.schema import JobWorker, utcnow

#: Seconds over which `status` reports each worker's recent throughput.
WINDOW = 60.0


@dataclass(frozen=True)
class Work:
    """What one commit adds to a worker's row."""

    rounds: int = 0
    item_rounds: int = 0
    done: int = 0
    failed: int = 0
    evals: int = 0


@dataclass(frozen=True)
class Window:
    """The worker's totals on the job at ``at`` (about WINDOW seconds back)."""

    at: datetime
    items: int = 0
    evals: int = 0


def record(s: Session, job_id: int, worker: str, node: str | None, work: Work, *, first_seen: datetime,
           window: Window, now: datetime | None = None) -> None:
    """Add ``work`` to (job, worker)'s row, creating it on the worker's first commit."""
    conn = s.connection()
    conn.execute(_upsert(conn.dialect.name), {
        "job_id": job_id, "worker": worker, "node": node, "rounds": work.rounds, "item_rounds": work.item_rounds,
        "items_done": work.done, "items_failed": work.failed, "evals": work.evals, "first_seen": first_seen,
        "last_seen": now or utcnow(), "win_at": window.at, "win_items": window.items, "win_evals": window.evals})


@lru_cache(maxsize=2)
def _upsert(dialect: str):
    """INSERT ... ON CONFLICT (job_id, worker) DO UPDATE adding to the totals, built once (it
    runs in every round's commit) and given its values as parameters."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the store is Postgres or SQLite
        raise NotImplementedError(dialect)
    table = JobWorker.__table__
    stmt = insert(table)
    new, old = stmt.excluded, table.c
    added = {c: old[c] + new[c] for c in ("rounds", "item_rounds", "items_done", "items_failed", "evals")}
    return stmt.on_conflict_do_update(
        index_elements=[old.job_id, old.worker],
        set_={**added, "node": new.node, "last_seen": new.last_seen, "win_at": new.win_at,
              "win_items": new.win_items, "win_evals": new.win_evals})


def touch(s: Session, worker: str, job_ids: Iterable[int], now: datetime | None = None) -> int:
    """A worker still busy on these jobs (a long round, no commit yet): move its last_seen."""
    ids = sorted(set(job_ids))
    if not ids:
        return 0
    return s.execute(update(JobWorker).where(JobWorker.worker == worker, JobWorker.job_id.in_(ids))
                     .values(last_seen=now or utcnow())).rowcount or 0


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC


def job_workers(s: Session, job_id: int, now: datetime | None = None, window: float = WINDOW) -> list[dict]:
    """Every worker that committed a round of the job: its totals, its rates over the last
    ``window`` seconds (0 once it has not been seen for that long) and over its whole time on
    the job, and when it was last seen. Most recently seen first."""
    now = now or utcnow()
    out = []
    table = JobWorker.__table__  # plain rows: no ORM objects to build for a read-only view
    for w in s.execute(select(table).where(table.c.job_id == job_id)):
        first, last, win_at = _aware(w.first_seen), _aware(w.last_seen), _aware(w.win_at)
        items = w.items_done + w.items_failed
        span = (now - win_at).total_seconds()
        recent = (now - last).total_seconds() <= window and span > 0
        active = (last - first).total_seconds()
        out.append({
            "worker": w.worker, "node": w.node, "items_done": w.items_done, "items_failed": w.items_failed,
            "evaluations": w.evals, "rounds": w.rounds, "item_rounds": w.item_rounds,
            "items_per_second": (items - w.win_items) / span if recent else 0.0,
            "evals_per_second": (w.evals - w.win_evals) / span if recent else 0.0,
            "mean_items_per_second": items / active if active > 0 else 0.0,
            "mean_evals_per_second": w.evals / active if active > 0 else 0.0,
            "first_seen": first, "last_seen": last, "seen_seconds_ago": max(0.0, (now - last).total_seconds()),
        })
    out.sort(key=lambda r: (-r["last_seen"].timestamp(), r["node"] or "", r["worker"]))
    return out
