"""Worker memory over a 10,000-item job: resident memory at the end against after the first
100 items; target within 5% (issue 6, benchmark 4).

One ``difflabel worker`` subprocess (solo pool: the process that scores is the one started)
on a scratch Postgres database and Redis queue, as in bench/system.py. The items are the
held-out digit scans copied under distinct names until there are ``--items`` of them (every
item is its own row, its own x0 cache entry and its own score rows). The worker's VmRSS is
read from /proc every half second along with the number of finished items.

To stay within minutes on 2 CPU cores the job scores every class on 2 samples in one round
(``--min-scores 2 --max-scores 2``); the round, score and scheduler code paths are the full ones.

    python bench/memory.py [--items 10000] [--min-scores 2 --max-scores 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DIGITS, digit_files, machine, markdown_table, write_result  # noqa: E402
from bench.system import Services, submit, wait_job  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def sample(svc: Services, job_id: int, pid: int, out: list, stop: threading.Event) -> None:
    """Append (seconds, finished items, RSS MiB) every half second until ``stop``."""
    import psycopg

    t0 = time.monotonic()
    with psycopg.connect(svc.url, autocommit=True) as c:
        while not stop.is_set():
            done = c.execute("select count(*) from items where job_id = %s and status <> 'pending'",
                             (job_id,)).fetchone()[0]
            out.append((time.monotonic() - t0, done, rss_mib(pid)))
            stop.wait(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--min-scores", type=int, default=2)
    ap.add_argument("--max-scores", type=int, default=2)
    ap.add_argument("--baseline-items", type=int, default=100)
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the worker, e.g. MALLOC_ARENA_MAX=2 (a diagnosis)")
    ap.add_argument("--tag", default="", help="results file bench/results/memory_<tag>.txt")
    args = ap.parse_args()

    _, files, _ = digit_files()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    folder = tmp / "images"
    folder.mkdir()
    for i in range(args.items):
        f = files[i % len(files)]
        shutil.copy(f, folder / f"{i:06d}-{f.parent.name}-{f.name}")
    scoring = ["--min-scores", str(args.min_scores), "--max-scores", str(args.max_scores)]
    samples: list[tuple[float, int, float]] = []
    with Services() as svc:
        svc.env.update(kv.split("=", 1) for kv in args.worker_env)
        worker = svc.start_worker(tmp / "worker.log")
        warm = tmp / "warm"
        warm.mkdir()
        for f in sorted(folder.iterdir())[:10]:
            shutil.copy(f, warm / f.name)
        wait_job(svc, submit(svc, warm, DIGITS / "labels.txt", scoring))  # model loaded, first round run
        rss_warm = rss_mib(worker.pid)
        job = submit(svc, folder, DIGITS / "labels.txt", scoring)
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(svc, job, worker.pid, samples, stop), daemon=True)
        sampler.start()
        secs, labels = wait_job(svc, job, timeout=3600)
        time.sleep(1.0)  # one more sample after the last commit
        stop.set()
        sampler.join()
        rss_end = rss_mib(worker.pid)
    shutil.rmtree(tmp, ignore_errors=True)

    base = next(s for s in samples if s[1] >= args.baseline_items)
    peak = max(s[2] for s in samples)
    growth = (rss_end / base[2] - 1) * 100
    marks = [m for m in (args.baseline_items, 1000, 2500, 5000, 7500) if m < args.items]
    rows = [("worker started, model loaded, 10-image warm-up job done", "-", f"{rss_warm:.1f}", "-")]
    for m in marks:
        s = next(s for s in samples if s[1] >= m)
        rows.append((f"after {s[1]:,} items", f"{s[0]:.0f}", f"{s[2]:.1f}", f"{(s[2] / base[2] - 1) * 100:+.2f}%"))
    rows.append((f"end: all {len(labels):,} items finished", f"{samples[-1][0]:.0f}", f"{rss_end:.1f}",
                 f"**{growth:+.2f}%**"))
    rows.append(("peak during the job", "-", f"{peak:.1f}", f"{(peak / base[2] - 1) * 100:+.2f}%"))
    table = markdown_table(("point", "seconds into the job", "worker RSS MiB",
                            f"vs after {args.baseline_items} items"), rows)
    text = (f"Worker memory (target: end within 5% of after {args.baseline_items} items): one worker, "
            f"{args.items:,}-item job, {len(files)} distinct scans under distinct names, 10 classes, "
            f"min/max scores {args.min_scores}/{args.max_scores}; job took {secs:.0f} s "
            f"({args.items / secs:.1f} items/s); worker environment {' '.join(args.worker_env) or 'as is'}; "
            f"{machine()}\n"
            f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n\n{table}\n")
    write_result("memory" + (f"_{args.tag}" if args.tag else ""), text)


if __name__ == "__main__":
    main()
