"""`difflabel db upgrade` on a fresh Postgres database: creates the schema, idempotent."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, inspect, text

from orchestrator.db import normalise_url
from orchestrator.schema import Base

pytestmark = pytest.mark.integration


def test_db_upgrade_fresh_database(difflabel, postgres):
    url = postgres.create("_fresh")
    env = {"DIFFLABEL_DATABASE_URL": url}

    r = difflabel("list", env=env)  # not migrated yet: told what to run
    assert r.code == 2 and "difflabel db upgrade" in r.stderr and "Traceback" not in r.stderr, r

    # --database-url wins over the environment (which points at nothing here).
    r = difflabel("--database-url", url, "db", "upgrade",
                  env={"DIFFLABEL_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"})
    assert r.code == 0, r
    assert r.stdout.strip() == f"{url} is at revision 0007", r
    r = difflabel("db", "upgrade", env=env)  # a second run finds nothing to do
    assert r.code == 0 and r.stdout.strip().endswith("is at revision 0007"), r

    engine = create_engine(normalise_url(url))
    try:
        insp = inspect(engine)
        tables = set(insp.get_table_names())
        assert {"jobs", "job_classes", "items", "round_scores", "alembic_version"} <= tables
        assert "scores" not in tables
        for name, table in Base.metadata.tables.items():  # the migration creates the models' columns
            assert {c["name"] for c in insp.get_columns(name)} == set(table.columns.keys()), name
        assert {u["name"] for u in insp.get_unique_constraints("items")} >= {"uq_items_job_uri"}
        assert {i["name"] for i in insp.get_indexes("items")} >= {"ix_items_job_status"}
        assert insp.get_pk_constraint("round_scores")["constrained_columns"] == ["item_id", "round"]
        with engine.connect() as c:
            assert c.execute(text("select version_num from alembic_version")).scalars().all() == ["0007"]
    finally:
        engine.dispose()

    r = difflabel("list", "-o", "json", env=env)
    assert r.code == 0 and json.loads(r.stdout) == [], r
    r = difflabel("status", env=env)
    assert r.code == 2 and r.stderr.startswith("error: no jobs yet"), r


def test_schema_revision_is_the_migration_head():
    """ensure_schema's fast path trusts this constant: it must name the newest migration."""
    from alembic.script import ScriptDirectory

    from orchestrator import db

    head = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()
    assert db.SCHEMA_REVISION == head


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_0004_turns_unfinished_round_starts_into_expired_leases(postgres, tmp_path, backend):
    """A store from before leases: an item whose round start never ended (its worker died)
    becomes an expired lease, which the rescuer requeues uncharged; other items are untouched."""
    from orchestrator import db

    url = postgres.create("_m0004") if backend == "postgres" else f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0003")
    engine = create_engine(normalise_url(url))
    try:
        with engine.begin() as c:
            c.execute(text("insert into jobs (id, status, source, model, template, params, n_classes, n_items, "
                           "n_skipped, created_at) values (1, 'running', 's', 'demo', 'a {}', '{}', 2, 2, 0, "
                           "CURRENT_TIMESTAMP)"))
            for i, starts in ((1, 2), (2, 0)):
                c.execute(text("insert into items (id, job_id, uri, status, round, token, n_survivors, attempts, "
                               "starts, started_at, n_evals, updated_at) values (:i, 1, :u, 'pending', 3, :t, 2, 0, "
                               ":s, CURRENT_TIMESTAMP, 0, CURRENT_TIMESTAMP)"),
                          {"i": i, "u": f"img{i}", "t": f"tok{i}", "s": starts})
        db.upgrade(url)
        with engine.connect() as c:
            rows = c.execute(text("select id, lease_owner, lease_token, rescues, attempts from items order by id"))
            assert [tuple(r) for r in rows] == [(1, "migrated", "tok1", 2, 0), (2, None, None, 0, 0)]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_0005_packs_per_class_score_rows_into_one_row_per_round(postgres, tmp_path, backend):
    """Per-class rows of a store from before 0005 become one row per (item, round) holding the
    same float32 errors, read back identically; 1,000 classes stay one row."""
    import numpy as np

    from orchestrator import db, jobs

    url = postgres.create("_m0005") if backend == "postgres" else f"sqlite:///{tmp_path / 'old5.db'}"
    db.upgrade(url, "0004")
    engine = create_engine(normalise_url(url))
    rng = np.random.default_rng(0)
    old = {(0, k): rng.random(5, dtype=np.float32) for k in range(1000)}
    old.update({(1, k): rng.random(2, dtype=np.float32) for k in (3, 7)})
    try:
        with engine.begin() as c:
            c.execute(text("insert into jobs (id, status, source, model, template, params, n_classes, n_items, "
                           "n_skipped, created_at) values (1, 'running', 's', 'demo', 'a {}', '{}', 1000, 1, 0, "
                           "CURRENT_TIMESTAMP)"))
            c.execute(text("insert into items (id, job_id, uri, status, round, n_survivors, attempts, n_evals, "
                           "updated_at) values (1, 1, 'img', 'pending', 2, 2, 0, 5004, CURRENT_TIMESTAMP)"))
            c.execute(text("insert into scores (item_id, round, class_idx, errors) values (1, :r, :k, :e)"),
                      [{"r": r, "k": k, "e": e.astype("<f4").tobytes()} for (r, k), e in old.items()])
        db.upgrade(url)
        with engine.connect() as c:
            assert c.execute(text("select count(*) from round_scores")).scalar() == 2
        with db.sessions(url)() as s:
            got = jobs.item_scores(s, [1])[1]
        assert [(r, k) for r, k, _ in got] == sorted(old)
        assert all(np.array_equal(e, old[(r, k)]) for r, k, e in got)
    finally:
        engine.dispose()
