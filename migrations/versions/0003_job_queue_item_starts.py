"""jobs.queue (where its rounds go) and items.starts/started_at (round starts that never ended)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The automatic repair requeues a job's lost rounds onto the queue its workers consume.
    op.add_column("jobs", sa.Column("queue", sa.String(200), nullable=True))
    # A worker that dies on an item (out of memory, killed) leaves this above zero: the
    # next delivery isolates the item and, after DIFFLABEL_MAX_ATTEMPTS, fails it.
    op.add_column("items", sa.Column("starts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("items", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("items", "started_at")
    op.drop_column("items", "starts")
    op.drop_column("jobs", "queue")
