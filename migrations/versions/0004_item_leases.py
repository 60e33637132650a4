"""Item leases (holder, token, expiry, alone) and rescues, replacing round starts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as b:
        b.add_column(sa.Column("lease_owner", sa.String(200), nullable=True))
        b.add_column(sa.Column("lease_token", sa.String(32), nullable=True))
        b.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("lease_alone", sa.Boolean(), nullable=False, server_default=sa.text("false")))
        b.add_column(sa.Column("rescues", sa.Integer(), nullable=False, server_default="0"))
    # A round start that never ended (0003's ``starts``) becomes an expired lease: the rescuer
    # requeues it at once, uncharged, and the item runs alone next.
    op.execute("UPDATE items SET lease_owner = 'migrated', lease_token = token, rescues = starts, "
               "lease_expires_at = started_at WHERE starts > 0 AND status = 'pending'")
    with op.batch_alter_table("items") as b:
        b.drop_column("started_at")
        b.drop_column("starts")
    op.create_index("ix_items_lease", "items", ["job_id", "lease_expires_at"],
                    postgresql_where=sa.text("lease_owner IS NOT NULL"),
                    sqlite_where=sa.text("lease_owner IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_items_lease", table_name="items")
    with op.batch_alter_table("items") as b:
        b.add_column(sa.Column("starts", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("items") as b:
        b.drop_column("rescues")
        b.drop_column("lease_alone")
        b.drop_column("lease_expires_at")
        b.drop_column("lease_token")
        b.drop_column("lease_owner")
