"""Score store size: rows and bytes per finished item in Postgres, one row per (item, round)
against the earlier one row per (item, round, class).

* 10 labels, real: the demo model labels held-out digit scans with the default settings
  (`difflabel submit --local` against a scratch Postgres database); the bytes are
  ``pg_total_relation_size`` of the score table (heap, TOAST and primary-key index).
* 1,000 labels, synthetic: no many-label model ships yet, so the rounds an item would store are
  written directly: a first round of 1,000 classes x 5 samples, then 5 rounds of 10 survivors
  x 2 samples (the shape of the default schedule after a first-round prune).

The earlier layout is measured by writing the same errors as per-class rows into a table of
that shape in the same database.

    python bench/store_size.py [--images 100] [--items-1000 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import digit_files, machine, markdown_table, write_result  # noqa: E402

PG = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
BIN = Path(sys.executable).parent

OLD_TABLE = ("CREATE TABLE scores_old (item_id bigint, round integer, class_idx integer, errors bytea, "
             "PRIMARY KEY (item_id, round, class_idx))")


def _size(c, table: str) -> int:
    c.execute("VACUUM (ANALYZE) " + table)
    return c.execute(f"SELECT pg_total_relation_size('{table}')").fetchone()[0]


def _old_layout(c) -> None:
    """The same errors as one row per (item, round, class)."""
    import numpy as np

    c.execute(OLD_TABLE)
    rows = []
    for item_id, rnd, n, classes, blob in c.execute(
            "SELECT item_id, round, n_samples, classes, errors FROM round_scores").fetchall():
        ks = np.frombuffer(classes, dtype="<i2")
        errs = np.frombuffer(blob, dtype="<f4").reshape(len(ks), n)
        rows += [(item_id, rnd, int(k), errs[i].tobytes()) for i, k in enumerate(ks)]
    with c.cursor().copy("COPY scores_old (item_id, round, class_idx, errors) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


def measure(c, n_items: int) -> tuple[float, float, float, float]:
    rows = c.execute("SELECT count(*) FROM round_scores").fetchone()[0]
    new_bytes = _size(c, "round_scores")
    _old_layout(c)
    old_rows = c.execute("SELECT count(*) FROM scores_old").fetchone()[0]
    old_bytes = _size(c, "scores_old")
    return rows / n_items, new_bytes / n_items, old_rows / n_items, old_bytes / n_items


def real_job(url: str, n_images: int, tmp: Path) -> tuple[int, tuple]:
    import psycopg

    _, files, _ = digit_files()
    folder = tmp / "scans"
    folder.mkdir()
    for i, f in enumerate(files[:n_images]):
        (folder / f"{i:04d}.png").write_bytes(Path(f).read_bytes())
    env = {**os.environ, "DIFFLABEL_DATABASE_URL": url, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("DIFFLABEL_BROKER_URL", None)
    labels = (Path(__file__).resolve().parents[1] / "examples" / "digits" / "labels.txt")
    subprocess.run([str(BIN / "difflabel"), "db", "upgrade"], env=env, check=True, capture_output=True)
    p = subprocess.run([str(BIN / "difflabel"), "submit", str(folder), "--labels-file", str(labels), "--local",
                        "--no-progress"], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"submit failed ({p.returncode}): {p.stderr[-2000:]}")
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        n = c.execute("SELECT count(*) FROM items WHERE status = 'done'").fetchone()[0]
        return n, measure(c, n)


def synthetic_1000(url: str, n_items: int) -> tuple:
    import numpy as np
    import psycopg

    from orchestrator import db, jobs
    from worker.config import ScoringConfig

    db.upgrade(url)
    labels = [f"label {i}" for i in range(1000)]
    Session = db.sessions(url)
    with Session.begin() as s:
        job = jobs.create_job(s, source="synthetic", model="demo", template="{}", labels=labels, prompts=labels,
                              config=ScoringConfig())
        jobs.add_items(s, job, [(f"img{i}", None, None) for i in range(n_items)])
        ids = [i for i, in s.execute(__import__("sqlalchemy").text("SELECT id FROM items WHERE job_id = :j"),
                                     {"j": job.id})]
    rng = np.random.default_rng(0)
    rows = []
    for item_id in ids:
        rows.append(jobs.pack_round(item_id, 0, range(1000), rng.random((1000, 5), dtype=np.float32)))
        survivors = sorted(rng.choice(1000, 10, replace=False))
        rows += [jobs.pack_round(item_id, r, survivors, rng.random((10, 2), dtype=np.float32)) for r in range(1, 6)]
    with psycopg.connect(url, autocommit=True) as c:
        with c.cursor().copy("COPY round_scores (item_id, round, n_samples, classes, errors) FROM STDIN") as cp:
            for r in rows:
                cp.write_row((r["item_id"], r["round"], r["n_samples"], r["classes"], r["errors"]))
        return measure(c, n_items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--items-1000", type=int, default=100)
    args = ap.parse_args()
    import psycopg

    made = []
    try:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for what in ("real", "synthetic"):
                name = f"bench_store_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
                    c.execute(f'CREATE DATABASE "{name}"')
                made.append(name)
                url = f"{PG}/{name}"
                if what == "real":
                    n, m = real_job(url, args.images, Path(tmp))
                    out.append([f"10 labels: {n} held-out digit scans, demo model, default settings", *m])
                else:
                    m = synthetic_1000(url, args.items_1000)
                    out.append([f"1,000 labels: {args.items_1000} synthetic items (1 round of 1,000 x 5, "
                                "5 of 10 x 2)", *m])
    finally:
        from orchestrator import db

        db.get_engine.cache_clear()  # close this process's pooled connections before dropping
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            for name in made:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    table = markdown_table(
        ["workload", "rows per item (one per round)", "bytes per item", "rows per item (one per class, before)",
         "bytes per item (before)"],
        [[w, f"{a:.1f}", f"{b:,.0f}", f"{c:.1f}", f"{d:,.0f}"] for w, a, b, c, d in out])
    text = f"Score store size in Postgres ({machine()})\ncommand: python {' '.join(sys.argv)}\n\n{table}\n"
    write_result("store_size", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
