"""Fixtures for the fault-injection suite: private servers, moto S3, the tiny model, and
the labels of a fault-free run that every scenario's labels must equal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (AWS_ENV, BIN, LABELS, REPO, SLOW_JOB, Cluster, PrivatePostgres,  # noqa: E402
                     PrivateRedis, Unavailable, free_port, wait_port)

DIGITS = REPO / "examples" / "digits"


def _unavailable(why: object) -> None:
    """Skip on a laptop without the servers; fail in CI, where they must be installed."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"fault tests need their servers (CI=true): {why}", pytrace=False)
    pytest.skip(str(why))


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    try:
        pg = PrivatePostgres()
        pg.init()
        pg.start()
    except (Unavailable, FileNotFoundError, subprocess.TimeoutExpired) as e:
        _unavailable(e)
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    try:
        r = PrivateRedis()
        r.start()
    except Unavailable as e:
        _unavailable(e)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    exe = BIN / "moto_server"
    if not exe.exists():
        _unavailable("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **AWS_ENV})
    try:
        wait_port(port, 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def model(tiny_pixel_model) -> str:
    return str(Path(tiny_pixel_model).resolve())


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """32 distinct digit scans, 3 or 4 per digit."""
    folder = tmp_path_factory.mktemp("images")
    per = [sorted(d.glob("*.png")) for d in sorted(DIGITS.iterdir()) if d.is_dir()]
    for i in range(32):
        src = per[i % 10][i // 10]
        shutil.copyfile(src, folder / f"img{i:02d}_{src.parent.name}.png")
    return folder


@pytest.fixture(scope="session")
def source(images, s3_endpoint) -> str:
    """The same 32 scans in a bucket of the S3 server: the jobs under fault read them from there."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in AWS_ENV.items()
                                                           if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    s3.create_bucket(Bucket="faults")
    for p in sorted(images.iterdir()):
        s3.put_object(Bucket="faults", Key=f"scans/{p.name}", Body=p.read_bytes())
    return "s3://faults/scans/"


@pytest.fixture(scope="session")
def reference(images, model, tmp_path_factory) -> dict[str, str]:
    """File name -> label from a fault-free run of the same job (in-process, SQLite)."""
    import json

    db = tmp_path_factory.mktemp("ref") / "ref.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFLABEL_")}
    env.update({"DIFFLABEL_DATABASE_URL": f"sqlite:///{db}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    run = [str(BIN / "difflabel"), "submit", str(images), "--labels", ",".join(LABELS), "--model", model,
           *SLOW_JOB, "--local", "--no-progress"]
    p = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().splitlines()[-1]
    p = subprocess.run([str(BIN / "difflabel"), "results", job, "-o", "jsonl"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 32 and all(r["label"] for r in rows)
    return {Path(r["uri"]).name: r["label"] for r in rows}


@pytest.fixture
def cluster(private_redis, private_postgres, s3_endpoint, model, tmp_path) -> Iterator[Cluster]:
    c = Cluster(private_redis, private_postgres, s3_endpoint, model, tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def timer():
    start = time.monotonic()
    return lambda: time.monotonic() - start
