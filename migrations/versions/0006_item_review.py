"""Human review of an item's label: the reviewed label, who gave it and when

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as b:
        b.add_column(sa.Column("reviewed_label", sa.Text(), nullable=True))
        b.add_column(sa.Column("reviewed_by", sa.Text(), nullable=True))
        b.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
        # Where the item went for review (e.g. "label-studio:<url>#<project>/<task>"), so a
        # second push does not create a duplicate task and a pull finds its answers.
        b.add_column(sa.Column("review_ref", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as b:
        b.drop_column("review_ref")
        b.drop_column("reviewed_at")
        b.drop_column("reviewed_by")
        b.drop_column("reviewed_label")
