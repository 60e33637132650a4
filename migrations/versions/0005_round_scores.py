"""round_scores: one row per (item, round) with all its classes' errors, replacing scores

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: Items whose old rows are read and rewritten per batch.
ITEMS_PER_BATCH = 2_000
#: Rows written per statement on the way down.
BATCH = 20_000


def _row(np, key, ks, errs) -> dict:
    return {"item_id": key[0], "round": key[1], "n_samples": len(errs[0]) // 4,
            "classes": np.asarray(ks, dtype="<i2").tobytes(), "errors": b"".join(errs)}


def upgrade() -> None:
    import numpy as np

    op.create_table(
        "round_scores",
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("classes", sa.LargeBinary(), nullable=False),
        sa.Column("errors", sa.LargeBinary(), nullable=False),
    )
    conn = op.get_bind()
    table = sa.table("round_scores", sa.column("item_id"), sa.column("round"), sa.column("n_samples"),
                     sa.column("classes"), sa.column("errors"))
    ids = [r[0] for r in conn.execute(sa.text("SELECT DISTINCT item_id FROM scores ORDER BY item_id"))]
    query = sa.text("SELECT item_id, round, class_idx, errors FROM scores WHERE item_id IN :ids "
                    "ORDER BY item_id, round, class_idx").bindparams(sa.bindparam("ids", expanding=True))
    for i in range(0, len(ids), ITEMS_PER_BATCH):  # whole items per batch: a round is never split
        out, key, ks, errs = [], None, [], []
        for item_id, rnd, k, blob in conn.execute(query, {"ids": ids[i : i + ITEMS_PER_BATCH]}):
            if (item_id, rnd) != key:
                if key is not None:
                    out.append(_row(np, key, ks, errs))
                key, ks, errs = (item_id, rnd), [], []
            ks.append(k)
            errs.append(bytes(blob))
        if key is not None:
            out.append(_row(np, key, ks, errs))
        if out:
            conn.execute(table.insert(), out)
    op.drop_table("scores")


def downgrade() -> None:
    import numpy as np

    op.create_table(
        "scores",
        sa.Column("item_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("class_idx", sa.Integer(), primary_key=True),
        sa.Column("errors", sa.LargeBinary()),
    )
    conn = op.get_bind()
    table = sa.table("scores", sa.column("item_id"), sa.column("round"), sa.column("class_idx"),
                     sa.column("errors"))
    out = []
    for item_id, rnd, n, classes, blob in conn.execute(
            sa.text("SELECT item_id, round, n_samples, classes, errors FROM round_scores")):
        ks = np.frombuffer(classes, dtype="<i2")
        errs = np.frombuffer(blob, dtype="<f4").reshape(len(ks), n)
        out += [{"item_id": item_id, "round": rnd, "class_idx": int(k), "errors": errs[i].tobytes()}
                for i, k in enumerate(ks)]
        if len(out) >= BATCH:
            conn.execute(table.insert(), out)
            out = []
    if out:
        conn.execute(table.insert(), out)
    op.drop_table("round_scores")
