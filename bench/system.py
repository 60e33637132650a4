"""System overhead: images per second of a distributed job (one worker, real Redis and Postgres)
divided by in-process ``classify`` on the same images, model and settings (issue 6, benchmark 2).

Services: Postgres at 127.0.0.1:5432 (a scratch database, created and dropped here) and Redis
at 127.0.0.1:6379 (a scratch queue). One ``difflabel worker`` subprocess, one intra-op thread,
as is this process's in-process side.

Steady state, excluding process start and model load on both sides:
* distributed: the worker is started and warmed up on a small job first; a timed job is
  submitted with the ``difflabel submit`` CLI, and its time runs from the job row's
  ``created_at`` (written by submit after its imports) to the last item's ``finished_at``:
  listing, item rows, enqueue, every round task, every score write and the scheduler;
* in-process: the model is loaded once; a timed run reads, decodes and encodes the files
  and runs ``worker.classifier.classify_images`` as ``difflabel classify`` does.
The two alternate, repeat by repeat; the ratio is per pair.

    python bench/system.py [--images 200] [--repeats 3] [--items-per-task 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (DIGITS, digit_files, interleave, machine, markdown_table,  # noqa: E402
                          one_thread, paired_ratios, write_result)

VENV_BIN = Path(sys.executable).parent
PG = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


class Services:
    """A scratch Postgres database and Redis queue, and the environment naming them."""

    def __init__(self, items_per_task: int | None = None):
        self.dbname = f"difflabel_bench_{uuid.uuid4().hex[:8]}"
        self.queue = f"bench-{uuid.uuid4().hex[:8]}"
        self.url = f"{PG}/{self.dbname}"
        self.env = dict(os.environ, DIFFLABEL_DATABASE_URL=self.url, DIFFLABEL_BROKER_URL=REDIS,
                        DIFFLABEL_QUEUE=self.queue, OMP_NUM_THREADS="1", DIFFLABEL_DEVICE="cpu")
        if items_per_task:
            self.env["DIFFLABEL_ITEMS_PER_TASK"] = str(items_per_task)
        self.worker: subprocess.Popen | None = None

    def __enter__(self) -> "Services":
        import psycopg

        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            c.execute(f'create database "{self.dbname}"')
        self.cli("db", "upgrade")
        return self

    def cli(self, *args: str) -> str:
        p = subprocess.run([str(VENV_BIN / "difflabel"), *args], env=self.env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"difflabel {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
        return p.stdout

    def start_worker(self, log: Path) -> subprocess.Popen:
        self.worker = subprocess.Popen([str(VENV_BIN / "difflabel"), "worker", "--loglevel", "WARNING"],
                                       env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return self.worker

    def __exit__(self, *exc) -> None:
        import psycopg
        import redis

        if self.worker is not None:
            self.worker.terminate()
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        redis.Redis.from_url(REDIS).delete(self.queue)
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            c.execute(f'drop database if exists "{self.dbname}" with (force)')


def submit(svc: Services, folder: Path, labels_file: Path, extra: list[str]) -> int:
    out = svc.cli("submit", str(folder), "--labels-file", str(labels_file), "--no-progress", *extra)
    return int(out.strip().splitlines()[-1])


def wait_job(svc: Services, job_id: int, timeout: float = 1800) -> tuple[float, dict]:
    """Poll until the job is finished; (seconds from created_at to the last finished item, labels)."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(svc.url, autocommit=True) as c:
        while True:
            status = c.execute("select status from jobs where id = %s", (job_id,)).fetchone()[0]
            if status != "running":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout} s")
            time.sleep(0.2)
        secs = c.execute("""select extract(epoch from max(i.finished_at) - j.created_at) from items i
                            join jobs j on j.id = i.job_id where j.id = %s group by j.created_at""",
                         (job_id,)).fetchone()[0]
        labels = dict(c.execute("select uri, label from items where job_id = %s", (job_id,)).fetchall())
    if status != "done":
        raise RuntimeError(f"job {job_id} ended {status}")
    return float(secs), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--items-per-task", type=int, default=None,
                    help="DIFFLABEL_ITEMS_PER_TASK for the job (default: the settings default)")
    args = ap.parse_args()
    one_thread()
    from orchestrator.settings import DEFAULT_ITEMS_PER_TASK
    from worker.backends import load_backend
    from worker.classifier import classify_images
    from worker.config import ScoringConfig
    from worker.images import decode
    from worker.labels import prompts
    from worker.noise import content_key

    labels, files, _ = digit_files(args.images)
    tmp = Path(tempfile.mkdtemp(prefix="bench-system-"))
    folder = tmp / "images"
    folder.mkdir()
    for f in files:  # flat, names unique across classes
        shutil.copy(f, folder / f"{f.parent.name}-{f.name}")
    paths = sorted(folder.iterdir())
    labels_file = DIGITS / "labels.txt"
    warm = tmp / "warm"
    warm.mkdir()
    for f in paths[:10]:
        shutil.copy(f, warm / f.name)

    backend = load_backend("demo", device="cpu")
    config = ScoringConfig()  # the defaults, as the CLI's
    prompt_list = prompts(backend.default_template, labels)
    cond = backend.encode_prompts(prompt_list)
    last: dict[str, dict] = {}

    def in_process() -> float:
        t0 = time.perf_counter()
        blobs = [p.read_bytes() for p in paths]
        items = [(str(p), decode(b, name=str(p))) for p, b in zip(paths, blobs)]
        res = classify_images(backend, items, prompt_list, labels, config, cond=cond,
                              noise_keys=[content_key(b) for b in blobs])
        secs = time.perf_counter() - t0
        last["in_process"] = {r.key: r.label for r in res}
        last["in_process_evals"] = sum(r.n_evals for r in res)
        return len(paths) / secs

    with Services(args.items_per_task) as svc:
        svc.start_worker(tmp / "worker.log")
        t0 = time.perf_counter()
        wait_job(svc, submit(svc, warm, labels_file, []))
        print(f"worker started and warmed up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

        def distributed() -> float:
            secs, got = wait_job(svc, submit(svc, folder, labels_file, []))
            last["distributed"] = got
            return len(paths) / secs

        rates = interleave({"distributed": distributed, "in_process": in_process}, args.repeats)
    shutil.rmtree(tmp, ignore_errors=True)
    same = sum(last["distributed"][k] == v for k, v in last["in_process"].items())
    med, lo, hi = paired_ratios(rates["distributed"], rates["in_process"])
    per_task = args.items_per_task or DEFAULT_ITEMS_PER_TASK
    rows = [(f"{len(paths)} held-out digits, demo model, default settings", per_task,
             " / ".join(f"{r:.2f}" for r in rates["distributed"]),
             " / ".join(f"{r:.2f}" for r in rates["in_process"]),
             f"**{med:.3f}** ({lo:.3f}-{hi:.3f})", f"{same}/{len(paths)}")]
    table = markdown_table(("workload", "items per task", "distributed images/s (each repeat)",
                            "in-process images/s (each repeat)", "distributed / in-process (median, range)",
                            "same labels"), rows)
    text = (f"System overhead (target >= 0.85): {args.repeats} interleaved repeats; one worker "
            f"(solo pool, 1 thread), Redis + Postgres on this machine; {machine()}\n"
            f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n"
            f"evaluations per run: {last['in_process_evals']:,} "
            f"({last['in_process_evals'] / len(paths):.1f} per image)\n\n{table}\n")
    write_result("system", text)


if __name__ == "__main__":
    main()
