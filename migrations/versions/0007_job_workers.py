"""job_workers: what each worker process did on each job, for per-worker throughput in `status`

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per (job, worker process), written only by that process, in the transaction of
    # each round it commits: one small upsert per round, never contended; `status` reads a
    # job's rows by the primary key's prefix.
    op.create_table(
        "job_workers",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("worker", sa.String(200), primary_key=True),
        sa.Column("node", sa.String(200), nullable=True),
        sa.Column("rounds", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("item_rounds", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("items_done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("items_failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("evals", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        # The worker's totals on the job as they were at win_at, about a minute back: the
        # recent rate is (total - win_*) / (now - win_at).
        sa.Column("win_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("win_items", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("win_evals", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("job_workers")
