"""Scale of the control plane: `submit` of 100,000 S3 objects and `status` on 1,000,000 items.

Real services: Postgres (127.0.0.1:5432, a scratch database created and dropped here),
Redis (127.0.0.1:6379, a scratch queue), and moto's S3 server on a free port, run in this
process so the objects can be stored without 100,000 PUTs (the timed parts use HTTP).

    python bench/scale.py [--objects 100000] [--items 1000000]

Targets (issue): submit under 60 s; status under 0.3 s. Also times reading every item's
result (the library's paged query and `difflabel results -o csv`). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, p


def submit_bench(args, env, endpoint, dl, rows) -> None:
    """Objects are put straight into the in-process moto store (setup, not timed); the
    listing and the submit run in subprocesses, over HTTP, as a user's would."""
    import boto3
    import redis
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    t0 = time.perf_counter()
    # 100 folders of 1,000 (photos/000/...), one object in a thousand not an image.
    for i in range(args.objects):
        ext = "txt" if i % 1000 == 0 else "jpg"
        store.put_object("bench", f"photos/{i // 1000:03d}/img_{i:06d}.{ext}", b"x")
    print(f"stored {args.objects} objects in {time.perf_counter() - t0:.0f} s (setup)", file=sys.stderr)

    code = ("import sys, time; from orchestrator.s3 import list_objects; t = time.perf_counter(); "
            f"n = sum(1 for _ in list_objects('s3://bench/photos/', '{endpoint}')); "
            "print(n, time.perf_counter() - t)")
    _, p = run([sys.executable, "-c", code], dict(env, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    n_listed, t_list = p.stdout.split()
    rows.append(("S3 listing alone (100 folders listed concurrently, 1,000 per request)",
                 f"{int(n_listed):,} objects", float(t_list), None, "part of submit; moto serves it"))
    t_submit, p = run([dl, "submit", "s3://bench/photos/", "--labels", "cat,dog,bird", "--no-progress"], env)
    assert p.returncode == 0, p.stderr
    r = redis.Redis()
    queue = env["DIFFLABEL_QUEUE"]
    queued = r.llen(queue)
    rows.append((f"`difflabel submit` of {args.objects:,} S3 objects (list + rows + enqueue, incl. Python start)",
                 f"{args.objects:,} objects", t_submit, 60.0,
                 f"{queued} tasks queued; {p.stderr.strip().splitlines()[0]}"))
    r.delete(queue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    args = ap.parse_args()

    import boto3
    import psycopg
    import redis

    dbname = f"difflabel_bench_{uuid.uuid4().hex[:8]}"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1", DIFFLABEL_S3_ENDPOINT_URL=endpoint,
               DIFFLABEL_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{dbname}",
               DIFFLABEL_BROKER_URL="redis://127.0.0.1:6379/0", DIFFLABEL_QUEUE=queue)
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'create database "{dbname}"')
    rows = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        dl = str(VENV_BIN / "difflabel")
        t, p = run([dl, "db", "upgrade"], env)
        assert p.returncode == 0, p.stderr
        if args.objects:
            submit_bench(args, env, endpoint, dl, rows)

        # status on a 1M-item job: rows generated in SQL, with a realistic status mix.
        with psycopg.connect(env["DIFFLABEL_DATABASE_URL"], autocommit=True) as c:
            c.execute("""insert into jobs (name, status, source, model, template, params, n_classes, n_items,
                         n_skipped, created_at) values ('bench-1M', 'running', 's3://bench/big/', 'demo',
                         'a photo of a {}.', '{}', 10, %s, 0, now() - interval '1 hour') returning id""",
                      (args.items,))
            big = c.execute("select max(id) from jobs").fetchone()[0]
            t0 = time.perf_counter()
            c.execute("""insert into items (job_id, uri, status, round, survivors, n_survivors, attempts,
                         n_evals, updated_at, finished_at, label, label_idx, confidence, margin)
                         select %s, 's3://bench/big/' || g, case when g %% 10 < 6 then 'done'
                                when g %% 100 = 99 then 'failed' else 'pending' end,
                                3, '[0, 1]', case when g %% 10 < 6 then 1 else 2 end, 0, 200 + g %% 50, now(),
                                case when g %% 10 < 6 then now() - (g %% 3600) * interval '1 second' end,
                                case when g %% 10 < 6 then 'class' || (g %% 10) end,
                                case when g %% 10 < 6 then g %% 10 end,
                                case when g %% 10 < 6 then 0.5 + (g %% 50) / 100.0 end,
                                case when g %% 10 < 6 then (g %% 7) / 1000.0 end
                         from generate_series(1, %s) g""", (big, args.items))
            c.execute("analyze items")
            print(f"generated {args.items:,} item rows in {time.perf_counter() - t0:.0f} s (setup)",
                  file=sys.stderr)
        sys.path.insert(0, str(ROOT))
        os.environ["DIFFLABEL_DATABASE_URL"] = env["DIFFLABEL_DATABASE_URL"]
        from orchestrator import db, jobs
        from orchestrator.results import iter_results

        Session = db.sessions(env["DIFFLABEL_DATABASE_URL"])
        times = []
        for _ in range(5):
            with Session() as s:
                t0 = time.perf_counter()
                jobs.status_summary(s, jobs.get_job(s, big))
                times.append(time.perf_counter() - t0)
        rows.append((f"status query on a {args.items:,}-item job (library, warm, best of 5)", f"{args.items:,} items",
                     min(times), 0.3, f"median {sorted(times)[2]:.3f} s"))
        cli_times = []
        for _ in range(3):
            t, p = run([dl, "status", str(big), "-o", "json"], env)
            assert p.returncode == 0, p.stderr
            cli_times.append(t)
        rows.append((f"`difflabel status` CLI process on a {args.items:,}-item job (incl. Python start)",
                     f"{args.items:,} items", min(cli_times), 0.3, f"median {sorted(cli_times)[1]:.3f} s"))
        t0 = time.perf_counter()
        with Session() as s:
            n_rows = sum(1 for _ in iter_results(s, big))
        t_lib = time.perf_counter() - t0
        rows.append((f"results query: every item of a {args.items:,}-item job (library, id-ordered pages)",
                     f"{n_rows:,} rows", t_lib, None, f"{n_rows / t_lib:,.0f} rows/s"))
        t, p = run([dl, "results", str(big), "-o", "csv"], env)
        assert p.returncode == 0, p.stderr[-500:]
        n_lines = p.stdout.count("\n") - 1
        rows.append((f"`difflabel results -o csv` on a {args.items:,}-item job (incl. Python start)",
                     f"{n_lines:,} rows", t, None, f"{n_lines / t:,.0f} rows/s"))
        t, p = run([dl, "--version"], env)
        rows.append(("`difflabel --version` (Python + CLI start only, for reference)", "-", t, None, ""))
    finally:
        moto.stop()
        from orchestrator import db as _db

        _db.get_engine.cache_clear()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'drop database if exists "{dbname}" with (force)')

    print("| measurement | size | seconds | target | ratio to target | note |")
    print("|---|---|---|---|---|---|")
    for name, size, secs, target, note in rows:
        ratio = f"{secs / target:.2f}" if target else "-"
        print(f"| {name} | {size} | {secs:.3f} | {target if target else '-'} | {ratio} | {note} |")


if __name__ == "__main__":
    main()
