"""`difflabel serve` on a large job, and the README's picture of it.

    python bench/serve.py queries [--items 1000000]     # -> bench/results/serve.txt
    python bench/serve.py screenshot [--out docs/serve.png]

``queries``: a scratch Postgres database (127.0.0.1:5432, created and dropped here) with a
running job of ``--items`` items generated in SQL (60% labelled over the last hour, 1% failed;
1 labelled item in 10 reviewed, 1 review in 10 disagreeing); times each of the page's queries
in the library (best of 3, after one cold run), then the page's JSON through a real
`difflabel serve`: the first request (every figure computed), the next ones (served from its
cache), and a page left open for ``--watch`` seconds (the share of that time the server spent
answering it).

``screenshot``: a real job, the demo model labelling the 719 held-out digit scans
(examples/digits) in an embedded SQLite store, photographed with Debian's chromium while it
runs. The reviews in the picture are the scans' true digits, written into reviewed_label for
the least confident finished items (what a reviewer would be shown first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_serve(env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(VENV_BIN / "difflabel"), "serve", "--port", "0", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://"), f"serve printed {url!r}"
    return proc, url.split("#")[0]


def get(url: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
    return time.perf_counter() - t0, body


def queries(args) -> None:
    import psycopg

    from orchestrator import dashboard, db, jobs

    dbname = f"difflabel_bench_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    env = dict(os.environ, DIFFLABEL_DATABASE_URL=url)
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'create database "{dbname}"')
    rows: list[tuple[str, float, str]] = []
    try:
        subprocess.run([str(VENV_BIN / "difflabel"), "db", "upgrade"], env=env, check=True, capture_output=True)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("""insert into jobs (name, status, source, model, template, params, n_classes, n_items,
                         n_skipped, created_at) values ('bench-serve', 'running', 's3://bench/big/', 'demo',
                         'a photo of a {}.', '{}', 10, %s, 0, now() - interval '1 hour')""", (args.items,))
            job_id = c.execute("select max(id) from jobs").fetchone()[0]
            c.execute("insert into job_classes (job_id, idx, label, prompt) select %s, g, 'class' || g, "
                      "'a photo of a class' || g from generate_series(0, 9) g", (job_id,))
            t0 = time.perf_counter()
            c.execute("""insert into items (job_id, uri, status, round, survivors, n_survivors, attempts,
                         n_evals, updated_at, finished_at, label, label_idx, confidence, margin, reviewed_label)
                         select %s, 's3://bench/big/' || g, case when g %% 10 < 6 then 'done'
                                when g %% 100 = 99 then 'failed' else 'pending' end,
                                3, '[0, 1]', case when g %% 10 < 6 then 1 else 2 end, 0, 200 + g %% 50, now(),
                                case when g %% 10 < 6 or g %% 100 = 99 then now() - (g %% 3600) * interval '1 second' end,
                                case when g %% 10 < 6 then 'class' || (g %% 10) end,
                                case when g %% 10 < 6 then g %% 10 end,
                                case when g %% 10 < 6 then power(((g::bigint * 7919) %% 1000) / 1000.0, 0.3) end,
                                case when g %% 10 < 6 then (g %% 7) / 1000.0 end,
                                case when g %% 10 < 6 and g %% 100 < 10 then 'class' ||
                                     (case when g %% 1000 < 60 then (g + 1) %% 10 else g %% 10 end) end
                         from generate_series(1, %s) g""", (job_id, args.items))
            c.execute("analyze items")
            print(f"generated {args.items:,} items in {time.perf_counter() - t0:.0f} s (setup)", file=sys.stderr)

        Session = db.sessions(url)
        parts = {
            "summary (status_summary + labels)": lambda s, j: dashboard.summary(s, j),
            "throughput over time (60 bars)": lambda s, j: dashboard.throughput_series(s, j),
            "confidence histogram (20 bins)": lambda s, j: dashboard.confidence_histogram(s, j.id),
            "model/reviewer confusion": lambda s, j: dashboard.confusion(s, j.id),
            "least confident 24": lambda s, j: dashboard.least_confident(s, j.id),
            "job list line (quick summary)": lambda s, j: dashboard.job_brief(s, j),
        }
        for name, f in parts.items():
            times = []
            for _ in range(4):  # the first is the cold run
                with dashboard.read_only(Session) as s:
                    job = jobs.get_job(s, job_id)
                    t0 = time.perf_counter()
                    f(s, job)
                    times.append(time.perf_counter() - t0)
            rows.append((f"library: {name}", min(times[1:]), f"cold {times[0]:.3f} s"))

        proc, base = start_serve(env, "--job", str(job_id))
        try:
            t_first, body = get(f"{base}api/jobs/{job_id}")
            d = json.loads(body)
            assert d["summary"]["items"] == args.items and d["confusion"]["reviewed"] > 0
            rows.append(("HTTP: GET /api/jobs/<job>, first (every figure computed)", t_first,
                         f"{len(body):,} bytes"))
            again = [get(f"{base}api/jobs/{job_id}")[0] for _ in range(5)]
            rows.append(("HTTP: the same, next polls within the refresh interval (cached)", statistics.median(again),
                         "median of 5"))
            # the page's own polling, as a browser left open does it: both endpoints every 3 s
            busy, polls, t_end = [], 0, time.perf_counter() + args.watch
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                busy.append(get(f"{base}api/jobs")[0] + get(f"{base}api/jobs/{job_id}")[0])
                polls += 1
                time.sleep(max(0.0, 3.0 - (time.perf_counter() - t0)))
            rows.append((f"HTTP: a page left open, polling every 3 s for {args.watch:.0f} s: time spent answering",
                         sum(busy), f"{100 * sum(busy) / args.watch:.0f}% of the time; {polls} polls, "
                         f"slowest {max(busy):.2f} s, median {statistics.median(busy):.3f} s"))
            t_list, _ = get(f"{base}api/jobs")
            rows.append(("HTTP: GET /api/jobs", t_list, "1 job"))
            t_page, page = get(base)
            rows.append(("HTTP: GET / (the page)", t_page, f"{len(page):,} bytes"))
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        db.get_engine.cache_clear()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'drop database if exists "{dbname}" with (force)')

    lines = [f"`difflabel serve` on a running job of {args.items:,} items (Postgres, 2-core CPU machine)", "",
             "| measurement | seconds | note |", "|---|---|---|"]
    lines += [f"| {name} | {secs:.3f} | {note} |" for name, secs, note in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / "serve.txt"
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


def screenshot(args) -> None:
    from playwright.sync_api import sync_playwright
    from sqlalchemy import select, update

    from orchestrator import db
    from orchestrator.schema import Item

    tmp = Path(tempfile.mkdtemp(prefix="difflabel-serve-"))
    url = f"sqlite:///{tmp / 'difflabel.db'}"
    env = dict(os.environ, DIFFLABEL_DATABASE_URL=url, OMP_NUM_THREADS="1")
    env.pop("DIFFLABEL_BROKER_URL", None)
    digits = ROOT / "examples" / "digits"
    submit = subprocess.Popen([str(VENV_BIN / "difflabel"), "submit", str(digits), "--labels-file",
                               str(digits / "labels.txt"), "--model", "demo", "--name", "digits (held out)",
                               "--local", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    proc = None
    try:
        Session = None
        while Session is None:
            time.sleep(1)
            if (tmp / "difflabel.db").exists():
                Session = db.sessions(url)
        while True:  # until about 60% are labelled
            time.sleep(2)
            assert submit.poll() is None, "the job ended before the picture"
            with Session() as s:
                uris = s.execute(select(Item.status)).scalars().all()
            if uris and sum(st == "done" for st in uris) >= args.at * len(uris):
                break
        with Session.begin() as s:
            least = s.execute(select(Item.id, Item.uri).where(Item.status == "done")
                              .order_by(Item.confidence).limit(args.reviews)).all()
            for item_id, uri in least:
                s.execute(update(Item).where(Item.id == item_id).values(
                    reviewed_label=Path(uri).parent.name, reviewed_by="ground truth"))
        proc, base = start_serve(env)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.goto(base)
            page.wait_for_selector("#least img.thumb")
            for _ in range(100):
                if page.evaluate("[...document.querySelectorAll('#least img.thumb')].every(i => i.complete)"):
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            text = page.inner_text("body")
            browser.close()
        print(re.sub(r"\n+", " | ", text)[:600], file=sys.stderr)
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        submit.terminate()
        submit.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("queries")
    q.add_argument("--items", type=int, default=1_000_000)
    q.add_argument("--watch", type=float, default=120.0, help="seconds of polling like an open page")
    sc = sub.add_parser("screenshot")
    sc.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    sc.add_argument("--at", type=float, default=0.6, help="photograph when this share is labelled")
    sc.add_argument("--reviews", type=int, default=60, help="least confident items given their true digit")
    args = ap.parse_args()
    queries(args) if args.what == "queries" else screenshot(args)


if __name__ == "__main__":
    socket.setdefaulttimeout(120)
    main()
