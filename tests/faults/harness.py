"""Private services and fault injection for tests/faults and bench/faults.py.

Each fault test gets its own Redis and Postgres servers on free ports (so they can be
killed and restarted without touching the shared ones), moto's S3 server, and real
``difflabel worker`` processes. ``check`` states the invariants every scenario must keep.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
#: Round-long jobs for the tiny model: no pruning, 4 + 2k samples up to 24 per class, so
#: each item takes 11 rounds and a job of a few dozen items keeps two workers busy.
SLOW_JOB = ["--min-scores", "4", "--max-scores", "24", "--samples-per-round", "2", "--p-cutoff", "1e-12"]
LABELS = ["cat", "dog", "bird", "fish"]


class Unavailable(RuntimeError):
    """A server binary is missing or would not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise Unavailable(f"server on port {port} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise Unavailable(f"nothing listening on port {port} after {timeout} s")
            time.sleep(0.1)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:  # noqa: BLE001
        pass


class PrivateRedis:
    """redis-server on a free port, nothing on disk: a restart loses every queue."""

    def __init__(self, password: str | None = None):
        self.exe = shutil.which("redis-server")
        if not self.exe:
            raise Unavailable("redis-server is not installed (Debian package redis-server)")
        self.port, self.password, self.proc = free_port(), password, None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_pdeathsig)
        wait_port(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_for: float = 1.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


class PrivatePostgres:
    """initdb + pg_ctl in a temporary folder, run as the postgres user when we are root."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        pg_ctl = found[-1] if found else shutil.which("pg_ctl")
        if not pg_ctl:
            raise Unavailable("PostgreSQL server binaries are not installed (Debian package postgresql)")
        self.bindir = Path(pg_ctl).parent
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="difflabel-pg-"))
        self.data = self.root / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
            os.chmod(self.root, 0o755)

    def _run(self, *args: str, timeout: float = 120) -> None:
        p = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise Unavailable(f"{Path(args[0]).name} failed: {(p.stderr or p.stdout)[-500:]}")

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                  str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        if self.data.exists():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                            "-w", "stop"], capture_output=True, timeout=60)

    def restart(self, down_for: float = 1.0) -> None:
        self.stop("immediate")  # like a crash: open transactions are lost, not finished
        time.sleep(down_for)
        self.start()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'create database "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path
    name: str

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """One scenario's world: private Redis + Postgres database, its queue, its workers."""

    redis: PrivateRedis
    postgres: PrivatePostgres
    s3_endpoint: str
    model: str
    tmp: Path
    extra_env: dict = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self):
        self.db_url = self.postgres.create(f"faults_{uuid.uuid4().hex[:8]}")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFLABEL_", "AWS_", "CELERY_"))}
        self.env.update(AWS_ENV)
        self.env.update({
            "DIFFLABEL_DATABASE_URL": self.db_url, "DIFFLABEL_BROKER_URL": self.redis.url,
            "DIFFLABEL_QUEUE": f"faults-{uuid.uuid4().hex[:6]}", "DIFFLABEL_S3_ENDPOINT_URL": self.s3_endpoint,
            "DIFFLABEL_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            # Fast recovery for tests: a lost round is noticed in seconds, not minutes.
            "DIFFLABEL_VISIBILITY_TIMEOUT": "8", "DIFFLABEL_STALE_AFTER": "12", "DIFFLABEL_REPAIR_INTERVAL": "2",
            # A dead worker's leases run out in seconds (renewed every second while it lives).
            "DIFFLABEL_LEASE_SECONDS": "3",
            # Tasks go on to later rounds for a moment only, so a job makes many broker hops.
            "DIFFLABEL_TASK_SECONDS": "0.3",
            "DIFFLABEL_ITEMS_PER_TASK": "4", "DIFFLABEL_MAX_ATTEMPTS": "5",
        })
        self.env.update(self.extra_env)
        r = self.cli("db", "upgrade")
        assert r.returncode == 0, r.stderr

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "difflabel"), *map(str, args)], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)

    def start_worker(self, env: dict | None = None, wait: bool = True, cwd: Path | None = None,
                     args: tuple[str, ...] = ()) -> Worker:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:4]}"
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(BIN / "difflabel"), "worker", "--loglevel", "INFO", "--hostname",
                                     f"{name}@%h", *args], env={**self.env, **(env or {})}, stdout=fh,
                                    stderr=subprocess.STDOUT, cwd=cwd or REPO, preexec_fn=_pdeathsig)
        w = Worker(proc, log, name)
        self.workers.append(w)
        if wait:
            deadline = time.monotonic() + 120
            while "ready." not in w.text():
                assert proc.poll() is None, f"worker exited {proc.returncode}:\n{w.text()[-3000:]}"
                assert time.monotonic() < deadline, f"worker not ready:\n{w.text()[-3000:]}"
                time.sleep(0.2)
        return w

    def submit(self, source: str | Path, *extra: str, labels: list[str] = LABELS, model: str | None = None,
               cwd: Path | None = None) -> int:
        r = self.cli("submit", str(source), "--labels", ",".join(labels), "--model", model or self.model,
                     *SLOW_JOB, "--no-progress", *extra, cwd=cwd)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])

    def status(self, job_id: int) -> dict:
        r = self.cli("status", str(job_id), "-o", "json")
        assert r.returncode in (0, 1, 3), f"exit {r.returncode}: {r.stderr[-2000:]} {r.stdout[-2000:]}"
        return json.loads(r.stdout)

    def wait(self, job_id: int, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st["status"] != "running":
                return st
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name}\n{w.text()[-2000:]}" for w in self.workers)
                raise AssertionError(f"job {job_id} still running after {timeout} s: {st}\n{logs}")
            time.sleep(0.5)

    def in_flight(self) -> int:
        """Items a worker is scoring now (a lease on the item's current message)."""
        import psycopg

        with psycopg.connect(self.db_url) as c:
            return c.execute("select count(*) from items where status = 'pending' and lease_owner is not null "
                             "and lease_token = token").fetchone()[0]

    def items(self, job_id: int) -> list[dict]:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.db_url, row_factory=dict_row) as c:
            return c.execute("select * from items where job_id = %s order by id", (job_id,)).fetchall()

    def max_round(self) -> int:
        import psycopg

        with psycopg.connect(self.db_url) as c:
            return c.execute("select coalesce(max(round), 0) from items").fetchone()[0]

    def close(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)


def check(db_url: str, job_id: int, reference: dict[str, str] | None) -> dict:
    """The invariants of every scenario. Returns the table row's counts; asserts nothing
    so a bench can report; tests assert on the counts."""
    import numpy as np
    import psycopg

    with psycopg.connect(db_url) as c:
        job = c.execute("select status, n_items from jobs where id = %s", (job_id,)).fetchone()
        items = c.execute("select id, uri, status, label, error, round, n_evals from items where job_id = %s",
                          (job_id,)).fetchall()
        charged = c.execute("select coalesce(sum(attempts), 0) from items where job_id = %s", (job_id,)).fetchone()[0]
        scores = c.execute("select s.item_id, s.round, s.classes, s.errors from round_scores s join items i "
                           "on i.id = s.item_id where i.job_id = %s", (job_id,)).fetchall()
    by_item: dict[int, list] = {}
    for item_id, rnd, classes, blob in scores:  # one row per round: (K classes, K x n errors)
        by_item.setdefault(item_id, []).append((rnd, len(classes) // 2, len(np.frombuffer(blob, dtype="<f4"))))
    lost = duplicated = wrong = failed = skipped_rounds = 0
    for item_id, uri, status, label, error, rnd, n_evals in items:
        rows = by_item.get(item_id, [])
        if status == "done" and label:
            pass
        elif status == "failed" and error:
            failed += 1
        else:
            lost += 1  # unfinished, or finished without a label / reason
        if sum(n for _, _, n in rows) != n_evals:
            duplicated += 1  # evaluations counted that are not stored once each
        rounds = sorted({r for r, _, _ in rows})
        if rounds != list(range(len(rounds))) or (status == "done" and len(rounds) != rnd):
            skipped_rounds += 1
        if reference is not None and status == "done" and reference.get(Path(uri).name) != label:
            wrong += 1
    return {"job_status": job[0], "items": len(items), "n_items": job[1], "lost": lost, "charged": int(charged),
            "duplicated": duplicated, "wrong": wrong, "failed": failed, "skipped_rounds": skipped_rounds}


def report(row: dict) -> None:
    """Append a scenario's row to $DIFFLABEL_FAULT_REPORT (bench/faults.py reads it)."""
    path = os.environ.get("DIFFLABEL_FAULT_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
