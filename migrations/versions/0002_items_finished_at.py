"""index items by (job, finished_at) for status throughput

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `status` counts items finished in the last minutes; without this it scans the job.
    op.create_index("ix_items_job_finished", "items", ["job_id", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_items_job_finished", table_name="items")
