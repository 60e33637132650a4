"""The job lifecycle under ordinary operations, with real workers, Redis, Postgres and S3:
a broken worker beside a healthy one, a crash between a round's commit and its follow-up,
cancel then resume with rounds in flight, objects added and resumed while a job runs,
`retry --failed` with the broker down, a round longer than its lease, and a worker that
consumes two queues. Each scenario checks the same invariants as tests/faults/test_faults.py
and reports its row, with the seconds from the fault to the job's end."""

from __future__ import annotations

import shutil
import time

import pytest

from harness import AWS_ENV, LABELS, SLOW_JOB
from test_faults import finish, wait_in_flight

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _s3(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


def _copy_prefix(cluster, images, prefix: str, n: int | None = None, rename: str = "") -> list[str]:
    s3 = _s3(cluster)
    names = []
    for p in sorted(images.iterdir())[:n]:
        s3.put_object(Bucket="faults", Key=f"{prefix}/{rename}{p.name}", Body=p.read_bytes())
        names.append(f"{rename}{p.name}")
    return names


def _charged(cluster, job) -> int:
    return sum(it["attempts"] for it in cluster.items(job))


def test_broken_device_worker_refuses_to_start(cluster, source, reference, timer):
    """`--device cuda:0` on a machine without CUDA: the worker exits at once with its reason
    and takes no work; the healthy worker labels everything."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: cuda:0 is not a broken device here")
    broken = cluster.start_worker(wait=False, env={"DIFFLABEL_DEVICE": "cuda:0"})
    fault_at = time.monotonic()
    assert broken.proc.wait(120) == 2, broken.text()[-2000:]
    err = [line for line in broken.text().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cuda" in err[0].lower() and "--device cpu" in err[0], broken.text()[-2000:]
    cluster.start_worker()
    job = cluster.submit(source)
    finish(cluster, job, reference, "worker with an unusable device (cuda:0, no CUDA) beside a healthy one",
           "1 broken worker", timer, note="it exited at start with its reason", fault_at=fault_at)
    assert _charged(cluster, job) == 0


def test_worker_that_cannot_load_the_model_gives_items_back(cluster, source, reference, tmp_path, timer):
    """The job's model is a relative path that exists where the healthy worker runs and not
    where the broken one does: the broken worker releases every task uncharged, backs off,
    and exits 75 with one line after its failures in a row; the healthy one labels it all."""
    here = tmp_path / "site"
    here.mkdir()
    shutil.copytree(cluster.model, here / "tiny")
    broken = cluster.start_worker(env={"DIFFLABEL_MAX_WORKER_FAILURES": "3"})  # runs in the repo root
    job = cluster.submit(source, model="./tiny", cwd=here)  # queued: the broken worker takes it first
    fault_at = time.monotonic()
    deadline = time.monotonic() + 60
    while "cannot load model" not in broken.text():
        assert time.monotonic() < deadline, broken.text()[-3000:]
        time.sleep(0.2)
    cluster.start_worker(cwd=here)
    assert broken.proc.wait(120) == 75, broken.text()[-3000:]
    stops = [line for line in broken.text().splitlines() if line.startswith("error: difflabel worker stopping")]
    assert len(stops) == 1 and "cannot load model './tiny'" in stops[0], broken.text()[-3000:]
    finish(cluster, job, reference, "worker that cannot load the model beside a healthy one",
           "1 broken worker (3 failures)", timer, note="items given back uncharged; it exited 75",
           fault_at=fault_at)
    assert _charged(cluster, job) == 0


def test_crash_between_commit_and_follow_up(cluster, source, reference, timer):
    """A worker dies right after a round's commit, before its follow-up messages are sent
    (and before anything else): the items' handoff leases run out and the rescuer requeues
    them, uncharged; the job ends within seconds, not after the 900 s stale rule."""
    crasher = cluster.start_worker(env={"DIFFLABEL_TEST_CRASH": "after_commit"})
    job = cluster.submit(source)
    assert crasher.proc.wait(120) == 137, crasher.text()[-2000:]
    fault_at = time.monotonic()
    assert "dying after commit" in crasher.text()
    cluster.start_worker()
    row = finish(cluster, job, reference, "crash between a round's commit and its follow-up", "1 crash",
                 timer, note="handoff leases rescued", fault_at=fault_at)
    assert _charged(cluster, job) == 0, row


def test_cancel_then_resume_with_rounds_in_flight(cluster, source, reference, timer):
    cluster.start_worker(), cluster.start_worker()
    job = cluster.submit(source)
    wait_in_flight(cluster)
    fault_at = time.monotonic()
    r = cluster.cli("cancel", str(job))
    assert r.returncode == 0 and f"job {job} cancelled" in r.stdout, r
    r = cluster.cli("submit", source, "--resume", str(job), "--wait", "--timeout", "120", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    row = finish(cluster, job, reference, "cancel, then resume, with rounds in flight", "1 cancel + resume",
                 timer, note="resume --wait exit 0", fault_at=fault_at)
    assert _charged(cluster, job) == 0, row
    r = cluster.cli("cancel", str(job))  # a finished job: says so, cancels nothing
    assert r.returncode == 0 and "already done: nothing to cancel" in r.stderr, r


def test_objects_added_while_running_then_resume(cluster, images, reference, timer):
    """The user's sequence: a job runs with one worker; more objects land in the folder;
    `submit --resume JOB --wait` picks them up and ends when every item is labelled."""
    prefix = "grow"
    _copy_prefix(cluster, images, prefix, n=16)
    cluster.start_worker()
    job = cluster.submit(f"s3://faults/{prefix}/")
    wait_in_flight(cluster)
    added = _copy_prefix(cluster, images, prefix, n=16, rename="more_")
    ref = {**reference, **{n: reference[n[len("more_"):]] for n in added}}
    fault_at = time.monotonic()
    r = cluster.cli("submit", f"s3://faults/{prefix}/", "--resume", str(job), "--wait", "--timeout", "180",
                    "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 new items" in r.stderr, r.stderr
    row = finish(cluster, job, ref, "objects added while running, then submit --resume --wait", "16 new objects",
                 timer, note="resume --wait exit 0", fault_at=fault_at)
    assert row["items"] == 32 and _charged(cluster, job) == 0


def test_resume_refuses_other_settings(cluster, source):
    job = cluster.submit(source)
    r = cluster.cli("submit", source, "--resume", str(job), "--labels", "cat,dog", "--seed", "3", "--no-progress")
    assert r.returncode == 2, r
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "labels (2 given; the job has 4" in err[0] and "--seed 3 (the job uses 0)" in err[0], err
    same = cluster.cli("submit", source, "--resume", str(job), "--labels", ",".join(LABELS), *SLOW_JOB,
                       "--no-progress")
    assert same.returncode == 0, same.stderr  # the job's own settings may be repeated


def test_retry_failed_with_the_broker_down_changes_nothing(cluster, images, timer):
    import io

    s3 = _s3(cluster)
    for i, p in enumerate(sorted(images.iterdir())[:3]):
        s3.put_object(Bucket="faults", Key=f"retry/ok{i}.png", Body=p.read_bytes())
    s3.put_object(Bucket="faults", Key="retry/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"x" * 64)
    cluster.start_worker()
    job = cluster.submit("s3://faults/retry/")
    assert cluster.wait(job)["status"] == "partial"
    cluster.redis.stop()
    fault_at = time.monotonic()
    r = cluster.cli("retry", str(job), "--failed", "--no-progress", timeout=120)
    assert r.returncode == 69 and "broker" in r.stderr, r
    statuses = sorted(it["status"] for it in cluster.items(job))
    assert statuses == ["done", "done", "done", "failed"]  # nothing was reset
    cluster.redis.start()
    r = cluster.cli("retry", str(job), "--failed", "--no-progress")
    assert r.returncode == 0 and "1 failed items requeued" in r.stderr, r
    st = cluster.wait(job)
    assert st["status"] == "partial" and st["failed"] == 1  # the broken image fails again, with its reason
    from harness import report

    report({"scenario": "retry --failed with the broker down, then up", "faults": "broker down", "items": 4,
            "n_items": 4, "lost": 0, "duplicated": 0, "wrong": 0, "failed": 1, "job_status": st["status"],
            "charged": _charged(cluster, job),
            "seconds": round(timer(), 1), "to_end": round(time.monotonic() - fault_at, 1),
            "note": "exit 69 left the failed item failed; the second retry requeued it"})
    del io


def test_round_longer_than_its_lease_keeps_its_items(cluster, images, reference, timer):
    """A first round of many samples on every item outlasts the 1.5 s lease several times over:
    the heartbeat keeps it, so nothing is rescued, nothing redone, nothing charged."""
    _copy_prefix(cluster, images, "long", n=16)
    env = {"DIFFLABEL_LEASE_SECONDS": "1.5", "DIFFLABEL_REPAIR_INTERVAL": "0.5", "DIFFLABEL_ITEMS_PER_TASK": "16"}
    cluster.env.update(env)
    w = cluster.start_worker()
    start = time.monotonic()
    r = cluster.cli("submit", "s3://faults/long/", "--labels", ",".join(LABELS), "--model", cluster.model,
                    "--min-scores", "160", "--max-scores", "160", "--samples-per-round", "2", "--p-cutoff", "1e-12",
                    "--no-progress")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.split()[-1])
    st = cluster.wait(job, timeout=300)
    took = time.monotonic() - start
    rows = cluster.items(job)
    assert st["status"] == "done" and all(it["rescues"] == 0 and it["attempts"] == 0 for it in rows), rows
    assert "stopped renewing" not in w.text()
    assert took > 3 * 1.5, f"the round took {took:.1f} s: too short to outlast a lease"
    # Other settings than the reference run (160 samples, not 24): labels are not compared.
    finish(cluster, job, None, "one round of 16 x 4 x 160 samples, longer than the 1.5 s lease",
           "round >> lease", timer, note=f"{took:.0f} s round kept by the heartbeat", fault_at=start)
