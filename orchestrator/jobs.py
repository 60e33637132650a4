"""Job store queries: create jobs and items, read status, scores and round states (no torch).

Every change of an item's or a job's state is in ``orchestrator.lifecycle``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from orchestrator import fleet
from orchestrator.schema import FINISHED_ITEM, Item, ItemStatus, Job, JobClass, JobStatus, RoundScores, utcnow
from worker.config import ScoringConfig
from worker.errors import UsageError
from worker.messages import Message, new_token

if TYPE_CHECKING:
    import numpy as np

    from worker.rounds import ItemRounds

#: Rows per INSERT statement when adding items (keeps statements under driver limits).
INSERT_CHUNK = 5_000



def create_job(s: Session, *, source: str, model: str, template: str, labels: Sequence[str],
               prompts: Sequence[str], config: ScoringConfig, name: str | None = None,
               n_skipped: int = 0) -> Job:
    job = Job(name=name, source=source, model=model, template=template, params=config.to_dict(),
              n_classes=len(labels), n_skipped=n_skipped, status=JobStatus.RUNNING.value)
    s.add(job)
    s.flush()
    s.execute(insert(JobClass), [{"job_id": job.id, "idx": i, "label": lab, "prompt": p}
                                 for i, (lab, p) in enumerate(zip(labels, prompts))])
    return job


def add_items(s: Session, job: Job, objects: Iterable[tuple[str, str | None, int | None]]) -> int:
    """Insert (uri, etag, size) rows not already in the job, as ``objects`` arrive; returns
    how many were new. On Postgres rows go in with COPY (~10x fewer round trips and less
    parsing than multi-row INSERTs: it is most of `submit`'s time on a large bucket)."""
    existing = set(s.scalars(select(Item.uri).where(Item.job_id == job.id)))
    survivors = list(range(job.n_classes))
    now = utcnow()
    added, batch = 0, []
    for uri, etag, size in objects:
        if uri in existing:
            continue
        existing.add(uri)
        batch.append((uri, etag, size))
        if len(batch) >= INSERT_CHUNK:
            added += _insert_items(s, job.id, batch, survivors, now)
            batch = []
    if batch:
        added += _insert_items(s, job.id, batch, survivors, now)
    s.execute(update(Job).where(Job.id == job.id).values(
        n_items=select(func.count()).where(Item.job_id == job.id).scalar_subquery()))
    return added


_COPY_COLUMNS = ("job_id", "uri", "etag", "size", "status", "round", "token", "survivors", "n_survivors",
                 "attempts", "n_evals", "updated_at")


def _insert_items(s: Session, job_id: int, objects: list[tuple], survivors: list[int], now: datetime) -> int:
    pending = ItemStatus.PENDING.value
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        import json

        surv = json.dumps(survivors)
        cur = conn.connection.driver_connection.cursor()  # psycopg 3, inside the session's transaction
        with cur.copy(f"COPY items ({', '.join(_COPY_COLUMNS)}) FROM STDIN") as copy:
            for uri, etag, size in objects:
                copy.write_row((job_id, uri, etag, size, pending, 0, new_token(), surv, len(survivors),
                                0, 0, now))
        return len(objects)
    s.execute(insert(Item), [{"job_id": job_id, "uri": uri, "etag": etag, "size": size, "status": pending,
                              "round": 0, "token": new_token(), "survivors": survivors,
                              "n_survivors": len(survivors), "attempts": 0, "n_evals": 0, "updated_at": now}
                             for uri, etag, size in objects])
    return len(objects)


def get_job(s: Session, job_id: int) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise UsageError(f"no job {job_id}: `difflabel list` shows the jobs")
    return job


def latest_job(s: Session) -> Job:
    job = s.scalars(select(Job).order_by(Job.id.desc()).limit(1)).first()
    if job is None:
        raise UsageError("no jobs yet: start one with `difflabel submit`")
    return job


def labels_of(s: Session, job_id: int) -> list[str]:
    return list(s.scalars(select(JobClass.label).where(JobClass.job_id == job_id).order_by(JobClass.idx)))


def prompts_of(s: Session, job_id: int) -> list[str]:
    return list(s.scalars(select(JobClass.prompt).where(JobClass.job_id == job_id).order_by(JobClass.idx)))


def pending_messages(s: Session, job_id: int) -> list[Message]:
    """Messages for the job's pending items as they stand (a new job's first round: no
    queue has seen its tokens yet). Requeueing an older job is ``lifecycle.resume``."""
    rows = s.execute(select(Item.id, Item.round, Item.token).where(
        Item.job_id == job_id, Item.status == ItemStatus.PENDING.value).order_by(Item.id)).all()
    return [Message(i, r, t) for i, r, t in rows]


def counts(s: Session, job_id: int) -> dict[str, dict]:
    """Per status: items, evaluations spent, mean surviving classes, and items by surviving
    classes (``by_survivors``), from one scan of the (job, status, n_evals, n_survivors) index."""
    rows = s.execute(
        select(Item.status, Item.n_survivors, func.count(), func.coalesce(func.sum(Item.n_evals), 0))
        .where(Item.job_id == job_id).group_by(Item.status, Item.n_survivors)).all()
    out: dict[str, dict] = {}
    for st, k, n, ev in rows:
        c = out.setdefault(st, {"items": 0, "evals": 0, "survivors": 0.0, "by_survivors": {}})
        c["items"] += int(n)
        c["evals"] += int(ev)
        c["survivors"] += int(k or 0) * int(n)  # a sum here, a mean below
        c["by_survivors"][int(k or 0)] = int(n)
    for c in out.values():
        c["survivors"] = c["survivors"] / c["items"] if c["items"] else 0.0
    return out


def throughput(s: Session, job: Job, window: timedelta = timedelta(minutes=5)) -> float:
    """Items finished per second over the last ``window`` (or since the job started)."""
    now = utcnow()
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=timezone.utc)
    since = max(now - window, created)
    n = s.scalar(select(func.count()).where(Item.job_id == job.id, Item.status.in_(FINISHED_ITEM),
                                            Item.finished_at >= since))
    secs = (now - since).total_seconds()
    return (n or 0) / secs if secs > 0 else 0.0


def rebuild(n_classes: int, rounds: Sequence[tuple[int, np.ndarray, np.ndarray]], config: ScoringConfig
            ) -> ItemRounds:
    """Replay stored rounds [(round, classes, errors)] through ItemRounds: the same pruning as live."""
    from worker.rounds import ItemRounds

    state = ItemRounds(n_classes)
    for _, classes, errors in rounds:
        state.record([int(k) for k in classes], errors, config)
    return state


def items_per_task(job: Job, most: int, task_evals: int) -> int:
    """Items per round task for ``job``: ``most``, fewer where its first round is large."""
    return ScoringConfig.from_dict(job.params or {}).items_per_task(job.n_classes, most, task_evals)


def load_states(s: Session, item_ids: Sequence[int], n_classes: int, config: ScoringConfig) -> dict[int, ItemRounds]:
    return {i: rebuild(n_classes, rounds, config) for i, rounds in item_rounds(s, item_ids).items()}


def pack_round(item_id: int, round_: int, classes: Sequence[int], errors: np.ndarray) -> dict:
    """A ``round_scores`` row: (K,) classes as int16 and (K, n) errors as float32, little-endian."""
    import numpy as np

    errors = np.ascontiguousarray(errors, dtype="<f4")
    return {"item_id": item_id, "round": round_, "n_samples": int(errors.shape[1]) if errors.ndim == 2 else 0,
            "classes": np.asarray(classes, dtype="<i2").tobytes(), "errors": errors.tobytes()}


def item_rounds(s: Session, item_ids: Sequence[int]) -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    """item id -> [(round, classes (K,), float32 errors (K, n))] in round order, classes ascending:
    exactly as stored."""
    import numpy as np  # here, not at the top: `difflabel status` should not pay for it

    out: dict[int, list] = {i: [] for i in item_ids}
    if not item_ids:
        return out
    rows = s.execute(select(RoundScores.item_id, RoundScores.round, RoundScores.classes, RoundScores.errors,
                            RoundScores.n_samples)
                     .where(RoundScores.item_id.in_(list(item_ids)))
                     .order_by(RoundScores.item_id, RoundScores.round)).all()
    for item_id, rnd, classes, blob, n in rows:
        ks = np.frombuffer(classes, dtype="<i2")
        order = np.argsort(ks, kind="stable")
        out[item_id].append((rnd, ks[order], np.frombuffer(blob, dtype="<f4").reshape(len(ks), n)[order]))
    return out


def item_scores(s: Session, item_ids: Sequence[int]) -> dict[int, list[tuple[int, int, np.ndarray]]]:
    """item id -> [(round, class, errors float32)] in (round, class) order: exactly as stored."""
    return {i: [(rnd, int(k), errs[row]) for rnd, ks, errs in rounds for row, k in enumerate(ks)]
            for i, rounds in item_rounds(s, item_ids).items()}


def survivor_histogram(s: Session, job_id: int, c: dict | None = None) -> dict[str, int]:
    """Unfinished items by how many classes they still have, in power-of-two bins ("1", "2",
    "3-4", "5-8", ...), most classes first: where a job's remaining compute goes. ``c``: the
    job's ``counts`` when the caller has them (no second read)."""
    c = counts(s, job_id) if c is None else c
    bins: dict[tuple[int, int], int] = {}
    for k, n in c.get(ItemStatus.PENDING.value, {}).get("by_survivors", {}).items():
        k = max(int(k or 0), 1)
        hi = 1 << (k - 1).bit_length()  # the smallest power of two >= k
        lo = hi // 2 + 1 if hi > 2 else hi
        bins[(lo, hi)] = bins.get((lo, hi), 0) + int(n)
    return {(f"{lo}" if lo == hi else f"{lo}-{hi}"): bins[(lo, hi)] for lo, hi in sorted(bins, reverse=True)}


def in_flight(s: Session, job_id: int) -> int:
    """Pending items a worker holds a live lease on (read from the partial lease index)."""
    return s.scalar(select(func.count()).where(Item.job_id == job_id, Item.lease_owner.is_not(None),
                                               Item.lease_expires_at > utcnow(),
                                               Item.status == ItemStatus.PENDING.value)) or 0


def status_summary(s: Session, job: Job, quick: bool = False) -> dict:
    """What `difflabel status` shows; ``quick`` skips throughput (for `list`)."""
    c = counts(s, job.id)
    get = lambda st, f="items": c.get(st, {}).get(f, 0)  # noqa: E731
    done, failed = get(ItemStatus.DONE.value), get(ItemStatus.FAILED.value)
    pending, cancelled = get(ItemStatus.PENDING.value), get(ItemStatus.CANCELLED.value)
    total = done + failed + pending + cancelled
    out = {
        "job": job.id, "name": job.name, "status": job.status, "source": job.source, "model": job.model,
        "items": total, "done": done, "failed": failed, "remaining": pending, "cancelled": cancelled,
        "finished": done + failed + cancelled, "skipped_objects": job.n_skipped,
        "classes": job.n_classes, "created_at": job.created_at, "finished_at": job.finished_at,
    }
    if quick:
        return out
    evals = sum(v["evals"] for v in c.values())
    rate = throughput(s, job) if job.status == JobStatus.RUNNING.value else 0.0
    out.update(
        evaluations=evals,
        evals_per_finished_item=(get(ItemStatus.DONE.value, "evals") / done) if done else 0.0,
        surviving_classes=c.get(ItemStatus.PENDING.value, {}).get("survivors", 0.0),
        items_per_second=rate,
        eta_seconds=(pending / rate) if rate > 0 else None,
        in_flight=in_flight(s, job.id) if pending else 0,
        survivors_histogram=survivor_histogram(s, job.id, c) if pending else {},
        workers=fleet.job_workers(s, job.id),
        params=job.params, template=job.template,
    )
    return out
