"""The job store: jobs, their classes, items and per-round scores (SQLAlchemy 2).

Works on PostgreSQL (production, psycopg 3) and SQLite (embedded). Migrations in
``migrations/`` create exactly these tables; ``difflabel db upgrade`` applies them.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary,
                        String, Text, UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobStatus(str, enum.Enum):
    """Values are the strings stored in ``jobs.status``."""

    RUNNING = "running"
    DONE = "done"  # every item labelled
    PARTIAL = "partial"  # finished, some items failed
    FAILED = "failed"  # finished, every item failed
    CANCELLED = "cancelled"


class ItemStatus(str, enum.Enum):
    """Values are the strings stored in ``items.status``."""

    PENDING = "pending"  # queued for its next round
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_ITEM = (ItemStatus.DONE.value, ItemStatus.FAILED.value, ItemStatus.CANCELLED.value)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.RUNNING.value, index=True)
    source: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(Text)
    #: ScoringConfig.to_dict(): weighting, min/max scores, p_cutoff, seed, samples per round...
    params: Mapped[dict] = mapped_column(JSON)
    n_classes: Mapped[int] = mapped_column(Integer)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)  # listed, not images by name
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Broker queue its round tasks go to (None: run in-process only).
    queue: Mapped[str | None] = mapped_column(String(200))


class JobClass(Base):
    __tablename__ = "job_classes"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("job_id", "uri", name="uq_items_job_uri"),
        # status counts and the scheduler's "what is unfinished" both read this index.
        Index("ix_items_job_status", "job_id", "status", "n_evals", "n_survivors"),
        Index("ix_items_job_finished", "job_id", "finished_at"),  # status: recent throughput
        # The rescuer's "which leases have expired": only leased rows are in it.
        Index("ix_items_lease", "job_id", "lease_expires_at", postgresql_where=text("lease_owner IS NOT NULL"),
              sqlite_where=text("lease_owner IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    uri: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(String(100))
    size: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING.value)
    #: Rounds completed; the next round task for this item carries this number.
    round: Mapped[int] = mapped_column(Integer, default=0)
    #: Dispatch token of the one outstanding round task; other deliveries are dropped.
    token: Mapped[str | None] = mapped_column(String(32))
    survivors: Mapped[list | None] = mapped_column(JSON)
    n_survivors: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The lease: the worker scoring the item now (None: nobody), the token of the message it
    #: is running, and when the lease runs out unless its heartbeat renews it. Only an expired
    #: lease may be rescued (orchestrator.lifecycle). ``lease_token`` differs from ``token``
    #: while the holder hands the item on (committed, follow-up message not yet sent).
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The holder had this item alone in its task: if it dies, the item is the suspect.
    lease_alone: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    #: Times a worker died holding this item together with others (not charged as attempts;
    #: a rescued item runs alone next, so a second death is its own).
    rescues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_evals: Mapped[int] = mapped_column(Integer, default=0)
    label_idx: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    margin: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Human review (orchestrator.review): the label a reviewer chose, who (e.g.
    #: "label-studio:alice@example.com") and when; ``review_ref`` is where the item was sent for
    #: review. The model's own answer stays in ``label``.
    reviewed_label: Mapped[str | None] = mapped_column(Text)
    reviewed_by: Mapped[str | None] = mapped_column(Text)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    review_ref: Mapped[str | None] = mapped_column(Text)


class RoundScores(Base):
    """One round of one item: the errors of every class scored in it, one row.

    ``classes``: the class indices, int16 little-endian (K of them); ``errors``: the (K, n)
    float32 errors, row-major, little-endian; ``n_samples``: n. One row per (item, round) keeps
    the store small however many labels a job has (a row per class would be thousands of rows
    per item at 1,000 labels)."""

    __tablename__ = "round_scores"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_samples: Mapped[int] = mapped_column(Integer)
    classes: Mapped[bytes] = mapped_column(LargeBinary)
    errors: Mapped[bytes] = mapped_column(LargeBinary)


class JobWorker(Base):
    """What one worker process did on one job (migration 0007), for `status`.

    Written only by that process (``worker`` is its lease holder name), in the transaction of
    each round it commits, so its totals match the items it finished. ``win_*``: its totals
    as they were at ``win_at``, about ``orchestrator.fleet.WINDOW`` seconds back."""

    __tablename__ = "job_workers"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    worker: Mapped[str] = mapped_column(String(200), primary_key=True)
    node: Mapped[str | None] = mapped_column(String(200))  # the Celery node name, as Flower shows it
    rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    item_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    items_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    items_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    evals: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    win_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    win_items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    win_evals: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
