"""Infrastructure faults during a real job: workers killed or stopped, Redis and Postgres
restarted, tasks delivered twice, a worker out of memory. After each, the job must finish
with every item labelled exactly once (or failed with a reason), no score duplicated, no
round skipped, counts that add up, and the labels of a fault-free run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from harness import check, report

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_in_flight(cluster, timeout: float = 90) -> None:
    """Until the workers are past their first rounds (model loaded) and one is in the middle
    of a round (items started, not ended)."""
    deadline = time.monotonic() + timeout
    while cluster.in_flight() == 0 or cluster.max_round() < 2:
        assert time.monotonic() < deadline, "no round in flight"
        time.sleep(0.02)


def finish(cluster, job_id, reference, scenario: str, faults: str, timer, note: str = "",
           fault_at: float | None = None, **expect) -> dict:
    """Wait for the job, check the invariants, report the row. ``fault_at``: time.monotonic()
    of the fault, so the row shows how long the job took to end after it."""
    st = cluster.wait(job_id)
    to_end = round(time.monotonic() - fault_at, 1) if fault_at is not None else None
    row = check(cluster.db_url, job_id, reference)
    n = redone(cluster, job_id)
    notes = [f"job {row['job_status']}"] + ([f"{n} items labelled after an interrupted attempt"] if n else [])
    report({"scenario": scenario, "faults": faults, **row, "seconds": round(timer(), 1), "to_end": to_end,
            "note": "; ".join(notes + ([note] if note else []))})
    assert row["lost"] == 0 and row["duplicated"] == 0 and row["skipped_rounds"] == 0, row
    assert row["wrong"] == 0, row
    assert row["items"] == row["n_items"] == st["items"] == st["done"] + st["failed"], (row, st)
    assert row["failed"] == expect.get("failed", 0), row
    return row


def test_workers_killed_mid_round_are_replaced(cluster, source, reference, timer):
    workers = [cluster.start_worker(), cluster.start_worker()]
    job = cluster.submit(source)
    kills, fault_at = 0, None
    for i in range(3):
        wait_in_flight(cluster)
        victim = workers[i % 2]
        fault_at = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)  # no warm shutdown, no ack: the round is abandoned
        victim.proc.wait(10)
        kills += 1
        workers[i % 2] = cluster.start_worker(wait=i == 2)
    row = finish(cluster, job, reference, "worker SIGKILL mid-round", f"{kills} SIGKILLs", timer,
                 fault_at=fault_at)
    assert redone(cluster, job) >= 1, row  # a killed round came back and was run again


def redone(cluster, job_id: int) -> int:
    """Items with a failed or abandoned attempt behind them (the round was run again)."""
    import psycopg

    with psycopg.connect(cluster.db_url) as c:
        return c.execute("select count(*) from items where job_id = %s and (attempts > 0 or rescues > 0) "
                         "and status = 'done'", (job_id,)).fetchone()[0]


def test_warm_shutdown_finishes_its_round(cluster, source, reference, timer):
    a, _ = cluster.start_worker(), cluster.start_worker()
    job = cluster.submit(source)
    wait_in_flight(cluster)
    fault_at = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(60) == 0, a.text()[-2000:]  # warm shutdown: the round ends, then the worker
    assert "warm shutdown" in a.text().lower(), a.text()[-2000:]
    finish(cluster, job, reference, "worker SIGTERM mid-round", "1 SIGTERM", timer, fault_at=fault_at)


def test_redis_restart_loses_the_queue_and_repair_rebuilds_it(cluster, source, reference, timer):
    cluster.start_worker(), cluster.start_worker()
    job = cluster.submit(source)
    wait_in_flight(cluster)
    fault_at = time.monotonic()
    cluster.redis.restart(down_for=2)  # nothing on disk: every queued round task is gone
    cluster.wait(job)
    logs = "".join(w.text() for w in cluster.workers)
    repaired = sum(int(line.split(": ")[-1].split()[0]) for line in logs.splitlines()
                   if "had no live round task" in line)
    assert repaired >= 1, "the queue was lost, so an automatic repair must have run"
    finish(cluster, job, reference, "Redis restarted mid-job", "1 restart (queue lost)", timer,
           note=f"{repaired} items requeued by the automatic repair", fault_at=fault_at)


def test_postgres_restart_mid_job(cluster, source, reference, timer):
    cluster.start_worker(), cluster.start_worker()
    job = cluster.submit(source)
    wait_in_flight(cluster)
    fault_at = time.monotonic()
    cluster.postgres.restart(down_for=3)  # immediate: in-flight transactions are rolled back
    cluster.wait(job)
    retried = sum(w.text().count("database unreachable") for w in cluster.workers)
    finish(cluster, job, reference, "Postgres restarted mid-job", "1 crash-restart", timer,
           note=f"{retried} tasks handed on through the broker", fault_at=fault_at)
    assert retried >= 1, "no round task met the outage:\n" + "\n".join(w.text()[-3000:] for w in cluster.workers)


def test_every_task_delivered_twice(cluster, source, reference, timer):
    import redis

    job = cluster.submit(source)  # no worker yet: the first round's tasks wait in Redis
    r = redis.Redis.from_url(cluster.redis.url)
    queue = cluster.env["DIFFLABEL_QUEUE"]
    tasks = r.lrange(queue, 0, -1)
    assert tasks
    r.rpush(queue, *tasks)  # each task twice: two workers may take the two copies at once
    cluster.start_worker(wait=False), cluster.start_worker()
    finish(cluster, job, reference, "every first-round task delivered twice", f"{len(tasks)} duplicates",
           timer)


def _limit_memory(pid: int, limit: int) -> str | None:
    """Put ``pid`` in a cgroup (v1 or v2) with a hard memory limit; None when not possible."""
    for base, fname in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        group = Path(base) / f"difflabel-oom-{pid}"
        try:
            group.mkdir()
            (group / fname).write_text(str(limit))
            (group / "cgroup.procs").write_text(str(pid))
            return str(group)
        except OSError:
            continue
    return None


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_out_of_memory_on_one_huge_image(cluster, images, source, reference, timer):
    import io

    import boto3
    from PIL import Image

    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    for p in sorted(images.iterdir())[:12]:
        s3.put_object(Bucket="faults", Key=f"oom/{p.name}", Body=p.read_bytes())
    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000), 128).save(buf, "PNG")  # 144 Mpx: ~430 MB as RGB, 140 KB as PNG
    s3.put_object(Bucket="faults", Key="oom/huge.png", Body=buf.getvalue())
    folder = "s3://faults/oom/"
    env = {"DIFFLABEL_MAX_IMAGE_PIXELS": "200000000", "DIFFLABEL_MAX_ATTEMPTS": "2"}
    cluster.env.update(env)
    job = cluster.submit(folder)
    groups, deaths = [], 0

    def start():
        w = cluster.start_worker()
        g = _limit_memory(w.proc.pid, _rss(w.proc.pid) + 250 * 2**20)
        if g is None:
            pytest.skip("no writable memory cgroup here to run a worker out of memory")
        groups.append(g)
        return w

    w = start()
    deadline = time.monotonic() + 240
    while cluster.status(job)["status"] == "running":  # a supervisor: restart what the kernel kills
        assert time.monotonic() < deadline, "job did not finish"
        if w.proc.poll() is not None:
            assert w.proc.returncode == -signal.SIGKILL, w.text()[-2000:]
            deaths += 1
            w = start()
        time.sleep(0.3)
    row = finish(cluster, job, {**reference, "huge.png": None}, "worker out of memory on one image",
                 f"{deaths} OOM kills", timer, failed=1)
    results = cluster.cli("results", str(job), "-o", "jsonl")
    rows = {Path(r["uri"]).name: r for r in map(json.loads, results.stdout.splitlines())}
    assert rows["huge.png"]["status"] == "failed" and "worker died" in rows["huge.png"]["error"], rows["huge.png"]
    assert deaths >= 2 and row["items"] == 13
    for g in groups:
        try:
            os.rmdir(g)
        except OSError:
            pass
