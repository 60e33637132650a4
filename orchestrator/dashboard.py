"""What `difflabel serve` shows, as plain JSON-ready dicts: read-only queries on the job store.

Every query here is a SELECT that stays cheap on a 1,000,000-item job: counts come from the
(job, status, ...) index through ``jobs.status_summary``, throughput over time from the
(job, finished_at) index, the confidence histogram and the model/reviewer confusion are
GROUP BYs done in SQL (a few numbers come back, never the rows), and the least confident
items are an ``ORDER BY confidence LIMIT n``. ``bench/serve.py`` times them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Integer, cast, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import jobs
from orchestrator.schema import Item, ItemStatus, Job

#: Confidence histogram bins, over [0, 1] or a narrower [lo, 1] (see confidence_histogram).
HISTOGRAM_BINS = 20
#: Confidences are counted in SQL in steps of 1/FINE_BINS, then regrouped into the bins.
FINE_BINS = 1000
#: Where the histogram may start: each splits [lo, 1] into HISTOGRAM_BINS whole fine steps.
ZOOM_STARTS = (0.0, 0.5, 0.8, 0.9, 0.96, 0.98)
#: Bars in the throughput-over-time chart (at most; fewer for a job that ran briefly).
THROUGHPUT_BARS = 60
#: Bar widths the throughput chart may use (s): round numbers a reader can take in.
NICE_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
#: Least confident items shown with their thumbnails.
LEAST_CONFIDENT = 24
#: Labels the confusion table shows at most (the most reviewed); a 1,000-label job's full
#: matrix would not fit on a page.
CONFUSION_LABELS = 20
#: A query running longer than this is cancelled by Postgres: the page shows an error line
#: rather than holding a connection.
STATEMENT_TIMEOUT_MS = 20_000


@contextmanager
def read_only(Session: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction cannot write (Postgres enforces it) and is rolled back."""
    with Session() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SET TRANSACTION READ ONLY"))
            s.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
        try:
            yield s
        finally:
            s.rollback()


def iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:  # SQLite hands back naive datetimes; they are stored as UTC
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _plain(v: Any) -> Any:
    """JSON-ready: datetimes as ISO strings, everything else as it is."""
    if isinstance(v, datetime):
        return iso(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def job_rows(s: Session, limit: int = 50) -> list[Job]:
    """The most recent jobs (rows only: the caller decides which need their counts read)."""
    return list(s.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def job_brief(s: Session, job: Job) -> dict[str, Any]:
    """A line of the job list: ``status_summary``'s quick form plus the job's labels count."""
    out = _plain(jobs.status_summary(s, job, quick=True))
    out["progress"] = out["finished"] / out["items"] if out["items"] else 0.0
    return out


def summary(s: Session, job: Job) -> dict[str, Any]:
    """`difflabel status`'s summary of ``job`` (JSON-ready) and its labels."""
    out = _plain(jobs.status_summary(s, job))
    out["progress"] = out["finished"] / out["items"] if out["items"] else 0.0
    out["labels"] = jobs.labels_of(s, job.id)
    return out


def _floor(s: Session, expr):
    """floor() for a non-negative expression, on Postgres and SQLite alike (Postgres rounds a
    float cast to an integer; SQLite truncates it and may lack floor())."""
    if s.get_bind().dialect.name == "postgresql":
        return cast(func.floor(expr), Integer)
    return cast(expr, Integer)


def _epoch(s: Session, col):
    """Seconds since 1970 of a timestamp column."""
    if s.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", col)
    return (func.julianday(col) - 2440587.5) * 86400.0


def confidence_histogram(s: Session, job_id: int, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Labelled items by confidence in ``bins`` equal bins over [lo, 1] (1.0 in the last).

    ``lo`` is 0 unless every confidence is higher: a calibrated model that is sure of nearly
    everything (the demo model's confidences lie in 0.980-0.992) would fill one bin of [0, 1],
    so the bins close in on the data, to the largest of ZOOM_STARTS at or below the lowest
    confidence. One scan: items are counted in 1/FINE_BINS steps in SQL and regrouped here."""
    fine = _floor(s, Item.confidence * FINE_BINS)
    rows = s.execute(select(fine.label("b"), func.count()).where(
        Item.job_id == job_id, Item.status == ItemStatus.DONE.value, Item.confidence.is_not(None))
        .group_by(fine)).all()
    steps = {min(max(int(b), 0), FINE_BINS - 1): 0 for b, _ in rows}
    for b, n in rows:
        steps[min(max(int(b), 0), FINE_BINS - 1)] += int(n)
    lowest = min(steps, default=0)
    lo = max((z for z in ZOOM_STARTS if z * FINE_BINS <= lowest), default=0.0)
    start, width = round(lo * FINE_BINS), round((1 - lo) * FINE_BINS) // bins
    counts = [0] * bins
    for b, n in steps.items():
        counts[min((b - start) // width, bins - 1)] += n
    total = sum(counts)
    median = None
    if total:
        seen = 0
        for b in sorted(steps):
            seen += steps[b]
            if 2 * seen >= total:
                median = (b + 0.5) / FINE_BINS
                break
    return {"bins": bins, "lo": lo, "hi": 1.0, "counts": counts, "items": total, "median": median}


def nice_width(span_s: float, bars: int = THROUGHPUT_BARS) -> int:
    """The smallest round bar width that covers ``span_s`` in at most ``bars`` bars."""
    need = span_s / bars
    for w in NICE_WIDTHS:
        if w >= need:
            return w
    return int(-(-need // 86400) * 86400)  # whole days


def throughput_series(s: Session, job: Job, now: datetime | None = None,
                      bars: int = THROUGHPUT_BARS) -> dict[str, Any]:
    """Items finished (labelled and failed) per bar of time, from the job's start to its last
    finish (or to now while it runs): the time before the first finish (models loading,
    workers starting) shows too. Bars are a round number of seconds wide."""
    first, last = s.execute(select(func.min(Item.finished_at), func.max(Item.finished_at))
                            .where(Item.job_id == job.id)).one()
    if first is None:
        return {"start": None, "width_s": None, "done": [], "failed": []}
    utc = lambda t: t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # noqa: E731
    first, last = min(utc(first), utc(job.created_at)), utc(last)
    end = max(last, utc(now or datetime.now(timezone.utc))) if job.status == "running" else last
    width = nice_width(max((end - first).total_seconds(), 1.0), bars)
    t0 = int(first.timestamp()) // width * width  # bars on round clock times
    n_bars = int((end.timestamp() - t0) // width) + 1
    b = _floor(s, (_epoch(s, Item.finished_at) - t0) / width)
    # Every finished item from the (job, finished_at) index alone; then the failed and
    # cancelled ones (usually few) through the status index, and labelled = the rest. One
    # query grouping by status would read every row's status from the table: 1.6x as long.
    finished = s.execute(select(b.label("b"), func.count()).where(
        Item.job_id == job.id, Item.finished_at.is_not(None)).group_by(b)).all()
    others = s.execute(select(b.label("b"), Item.status, func.count()).where(
        Item.job_id == job.id, Item.status.in_((ItemStatus.FAILED.value, ItemStatus.CANCELLED.value)),
        Item.finished_at.is_not(None)).group_by(b, Item.status)).all()
    at = lambda i: min(max(int(i), 0), n_bars - 1)  # noqa: E731
    done, failed = [0] * n_bars, [0] * n_bars
    for i, n in finished:
        done[at(i)] += int(n)
    for i, st, n in others:
        done[at(i)] -= int(n)
        if st == ItemStatus.FAILED.value:
            failed[at(i)] += int(n)
    return {"start": iso(datetime.fromtimestamp(t0, timezone.utc)), "width_s": width, "done": done,
            "failed": failed}


def confusion(s: Session, job_id: int, labels: list[str] | None = None,
              most: int = CONFUSION_LABELS) -> dict[str, Any]:
    """The model's label against the reviewers' (items.label vs items.reviewed_label).

    ``cells[i][j]``: items the model called ``labels[i]`` that reviewers called ``labels[j]``.
    Only labels that occur in a reviewed item are kept, the ``most`` most frequent, in the job's
    class order (a reviewer's label outside the job's classes goes last); pairs outside them are
    counted in ``hidden``."""
    rows = s.execute(select(Item.label, Item.reviewed_label, func.count()).where(
        Item.job_id == job_id, Item.reviewed_label.is_not(None)).group_by(Item.label, Item.reviewed_label)).all()
    reviewed = sum(int(n) for *_, n in rows)
    agree = sum(int(n) for a, b, n in rows if a == b)
    if not rows:
        return {"reviewed": 0, "agree": 0, "labels": [], "cells": [], "hidden": 0}
    labels = labels if labels is not None else jobs.labels_of(s, job_id)
    weight: dict[str, int] = {}
    for a, b, n in rows:
        for lab in (a, b):
            key = "(no label)" if lab is None else lab
            weight[key] = weight.get(key, 0) + int(n)
    keep = set(sorted(weight, key=lambda k: (-weight[k], k))[:most])
    order = {lab: i for i, lab in enumerate(labels)}
    shown = sorted(keep, key=lambda k: (order.get(k, len(order)), k))
    at = {lab: i for i, lab in enumerate(shown)}
    cells = [[0] * len(shown) for _ in shown]
    hidden = 0
    for a, b, n in rows:
        a = "(no label)" if a is None else a
        b = "(no label)" if b is None else b
        if a in at and b in at:
            cells[at[a]][at[b]] += int(n)
        else:
            hidden += int(n)
    return {"reviewed": reviewed, "agree": agree, "labels": shown, "cells": cells, "hidden": hidden}


def least_confident(s: Session, job_id: int, n: int = LEAST_CONFIDENT) -> list[dict[str, Any]]:
    """The ``n`` labelled items the model was least sure of, least sure first."""
    rows = s.execute(select(Item.id, Item.uri, Item.label, Item.confidence, Item.margin, Item.n_evals,
                            Item.reviewed_label).where(
        Item.job_id == job_id, Item.status == ItemStatus.DONE.value, Item.confidence.is_not(None))
        .order_by(Item.confidence, Item.id).limit(n)).all()
    return [{"id": r.id, "uri": r.uri, "label": r.label, "confidence": r.confidence, "margin": r.margin,
             "n_evals": r.n_evals, "reviewed_label": r.reviewed_label} for r in rows]


def with_reviews(s: Session, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` (from ``least_confident``) with their reviewed labels as they are now: a few
    primary-key reads, so a cached list still shows reviews as they arrive."""
    if not items:
        return items
    now = dict(s.execute(select(Item.id, Item.reviewed_label).where(Item.id.in_([x["id"] for x in items]))).all())
    return [{**x, "reviewed_label": now.get(x["id"])} for x in items]


def item_uri(s: Session, job_id: int, item_id: int) -> str | None:
    """The image of item ``item_id`` if it is an item of job ``job_id``; else None."""
    return s.scalar(select(Item.uri).where(Item.id == item_id, Item.job_id == job_id))
