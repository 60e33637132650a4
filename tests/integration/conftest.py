"""Integration fixtures: the real services, started or created once per test session.

* Postgres: a fresh database ``difflabel_it_<random>`` on the server at
  DIFFLABEL_IT_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test), migrated,
  dropped at the end.
* Redis: the broker at DIFFLABEL_IT_REDIS_URL (default redis://127.0.0.1:6379/0) with a
  queue name of our own; only our own keys are deleted at the end (never FLUSHALL).
* S3: a moto standalone server subprocess on a free port, fake credentials.
* A real Celery worker process started with ``difflabel worker``, killed at the end.

A missing service skips the tests on a laptop but fails them when CI=true (STYLE.md, 6).
Commands are run as a user runs them: the ``difflabel`` console script in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from itsupport import _die_with_parent, digit_pngs, free_port, in_ci, stop, unavailable  # noqa: F401
from orchestrator.db import normalise_url

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: Admin connection used to create and drop this session's database.
POSTGRES_URL = os.environ.get("DIFFLABEL_IT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DIFFLABEL_IT_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Seconds to wait for the worker to say it is ready (torch import on a busy 2-core box).
WORKER_START_TIMEOUT = 120


def with_db(url: str, name: str) -> str:
    """``url`` pointing at database ``name``."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


# --------------------------------------------------------------------------- session identity


@pytest.fixture(scope="session")
def token() -> str:
    """A random tag in every name this session creates (database, queue, worker, bucket)."""
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- Postgres


@dataclass
class Postgres:
    admin_url: str
    token: str
    created: list[str]

    def create(self, suffix: str = "") -> str:
        """A new empty database; returns its URL. Dropped when the session ends."""
        from sqlalchemy import create_engine, text

        name = f"difflabel_it_{self.token}{suffix}"
        eng = create_engine(normalise_url(self.admin_url),
                            isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        self.created.append(name)
        return with_db(self.admin_url, name)

    def drop_all(self) -> None:
        from sqlalchemy import create_engine, text

        from orchestrator import db

        db.get_engine.cache_clear()  # engines held by in-process code; FORCE ends the rest
        eng = create_engine(normalise_url(self.admin_url),
                            isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            for name in self.created:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()
        self.created.clear()


@pytest.fixture(scope="session")
def postgres(token) -> Iterator[Postgres]:
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(normalise_url(POSTGRES_URL),
                            connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
    except Exception as e:  # noqa: BLE001 - any failure means "no Postgres here"
        unavailable(f"Postgres at {POSTGRES_URL}", str(e).strip().splitlines()[0])
    pg = Postgres(POSTGRES_URL, token, [])
    yield pg
    pg.drop_all()


@pytest.fixture(scope="session")
def database_url(postgres) -> str:
    """This session's migrated job store."""
    from orchestrator import db

    url = postgres.create()
    db.upgrade(url)
    return url


@pytest.fixture(scope="session")
def Session(database_url):
    from orchestrator import db

    return db.sessions(database_url)


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_client(token):
    try:
        import redis

        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        r.ping()
    except Exception as e:  # noqa: BLE001
        unavailable(f"Redis at {REDIS_URL}", e)
    yield r
    _delete_own_keys(r, token)
    r.close()


def _delete_own_keys(r, token: str) -> None:
    """Our queues, bindings and pidbox entries: every key or member naming our token."""
    for key in r.scan_iter(match=f"*{token}*", count=1000):
        r.delete(key)
    for key in r.scan_iter(match="_kombu.binding*", count=1000):
        kind = r.type(key).decode()
        if kind == "set":
            mine = [m for m in r.smembers(key) if token.encode() in m]
            if mine:
                r.srem(key, *mine)
        elif kind == "zset":
            mine = [m for m in r.zrange(key, 0, -1) if token.encode() in m]
            if mine:
                r.zrem(key, *mine)


@pytest.fixture(scope="session")
def queue(token) -> str:
    """The Celery queue our worker consumes."""
    return f"difflabel-it-{token}"


@pytest.fixture
def idle_queue(token, redis_client) -> Iterator[str]:
    """A queue nobody consumes: jobs submitted here stay pending. Empty at the start of
    each test and emptied after it."""
    name = f"difflabel-it-{token}-idle"
    redis_client.delete(name)
    yield name
    redis_client.delete(name)


# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3:
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3]:
    exe = BIN / "moto_server"
    if not exe.exists():
        exe = shutil.which("moto_server")
        if not exe:
            unavailable("moto_server (pip install 'moto[server]')", "not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV},
                                preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                unavailable("moto S3 server", f"exited with {proc.returncode}: {log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    unavailable("moto S3 server", f"not listening on {url} after 30 s")
                time.sleep(0.2)
        yield S3(url)
    finally:
        stop(proc, grace=5)


# --------------------------------------------------------------------------- environment + CLI


@pytest.fixture(scope="session")
def service_env(database_url, redis_client, queue, s3) -> dict[str, str]:
    """The environment a user of the distributed system would have."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIFFLABEL_", "AWS_", "CELERY_"))}
    env.update(AWS_ENV)
    env.update({
        "DIFFLABEL_DATABASE_URL": database_url,
        "DIFFLABEL_BROKER_URL": REDIS_URL,
        "DIFFLABEL_QUEUE": queue,
        "DIFFLABEL_S3_ENDPOINT_URL": s3.endpoint_url,
        "DIFFLABEL_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    })
    return env


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def __str__(self) -> str:  # shown when an assertion on it fails
        return f"exit {self.code}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


@pytest.fixture(scope="session")
def difflabel(service_env) -> Callable[..., Result]:
    """``difflabel(*args, env={...}, timeout=...)`` runs the console script like a user."""
    exe = BIN / "difflabel"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: pip install -e . in this virtualenv", pytrace=False)

    def run(*args: str, env: dict[str, str | None] | None = None, timeout: float = 180,
            cwd: str | Path | None = None) -> Result:
        e = dict(service_env)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        p = subprocess.run([str(exe), *map(str, args)], env=e, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd or REPO)
        return Result(p.returncode, p.stdout, p.stderr)

    return run


# --------------------------------------------------------------------------- the worker


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> None:
        assert self.proc.poll() is None, f"worker exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}"


@pytest.fixture(scope="session")
def worker(service_env, token, tmp_path_factory) -> Iterator[Worker]:
    """One ``difflabel worker`` process consuming this session's queue (solo pool, CPU)."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "difflabel"), "worker", "--loglevel", "INFO",
                                 "--hostname", f"it-{token}@%h"],
                                env=service_env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=_die_with_parent)
    w = Worker(proc, log)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while "ready." not in w.log_text():
            w.alive()  # the worker is product code: dying at start is a failure, not a skip
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready after {WORKER_START_TIMEOUT} s:\n{w.log_text()[-3000:]}")
            time.sleep(0.3)
        yield w
    finally:
        stop(proc)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def model(tiny_pixel_model) -> str:
    """The tiny 8x8 pixel model directory (absolute path), built once."""
    return str(Path(tiny_pixel_model).resolve())


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    """``make_images(folder, n, start=0)`` copies ``n`` good PNGs into ``folder``."""

    def make(folder: Path, n: int, start: int = 0, prefix: str = "img") -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i, src in enumerate(digit_pngs(start + n)[start:]):
            dst = folder / f"{prefix}{start + i:02d}.png"
            shutil.copyfile(src, dst)
            out.append(dst.resolve())
        return out

    return make
