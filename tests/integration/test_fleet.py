"""A fleet you can watch: Flower, each worker's Prometheus metrics, per-worker throughput in
`status`, all against a real job run by two real `difflabel worker` processes.

The module starts a real Flower (`celery flower`) on a free port against the test Redis,
then two workers on a queue of their own, each serving metrics on a free port (one capped
at 16 rows per model call). The job's queue is paused first (Celery's cancel_consumer) so
the scraped queue depth can be checked against Redis; then the workers run it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from itsupport import _die_with_parent, free_port, stop, FAST, LABELS, REPO, digit_pngs, items_of, job_finished, n_score_rows, wait_for
from orchestrator.schema import Item

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REDIS_URL = os.environ.get("DIFFLABEL_IT_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Seconds to wait for a worker to say it is ready (torch import on a busy 2-core box).
WORKER_START_TIMEOUT = 120
N_IMAGES = 16
ITEMS_PER_TASK = 2
CAPPED_BATCH = 16


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def get_json(url: str, timeout: float = 10):
    return json.loads(get(url, timeout))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """A worker's /metrics, parsed: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]








@dataclass
class FleetWorker:
    node: str
    port: int
    batch: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    queue: str
    env: dict
    flower: str
    workers: list[FleetWorker]
    readings: dict = field(default_factory=dict)


def _ready(w: FleetWorker) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while "ready." not in w.log_text():
        assert w.proc.poll() is None, f"worker exited ({w.proc.returncode}):\n{w.log_text()[-3000:]}"
        if time.monotonic() > deadline:
            pytest.fail(f"worker not ready after {WORKER_START_TIMEOUT} s:\n{w.log_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def fleet(service_env, token, redis_client, tmp_path_factory, model) -> Fleet:
    queue = f"difflabel-it-{token}-fleet"
    env = {**service_env, "DIFFLABEL_QUEUE": queue, "DIFFLABEL_ITEMS_PER_TASK": str(ITEMS_PER_TASK),
           "DIFFLABEL_TASK_SECONDS": "0.3"}
    logs = tmp_path_factory.mktemp("fleet")
    procs = []
    try:
        # Flower first, so it sees every event of the workers and the job.
        fport = free_port()
        with open(logs / "flower.log", "wb") as fh:
            flower = subprocess.Popen([str(BIN / "celery"), "-b", REDIS_URL, "flower", "--address=127.0.0.1",
                                       f"--port={fport}"], env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
                                      stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent)
        procs.append(flower)
        workers = []
        for i, batch in enumerate((CAPPED_BATCH, None)):
            node, port = f"fleet{i}-{token}@it", free_port()
            wenv = {**env, **({"DIFFLABEL_MAX_BATCH": str(batch)} if batch else {})}
            queues = f"{queue},{queue}-long" if i == 0 else queue  # the long round goes to the first
            log = logs / f"worker{i}.log"
            with open(log, "wb") as fh:
                p = subprocess.Popen([str(BIN / "difflabel"), "worker", "--hostname", node, "--queues", queues,
                                      "--metrics-port", str(port)], env=wenv, stdout=fh,
                                     stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent)
            procs.append(p)
            workers.append(FleetWorker(node, port, batch or 0, p, log))
        for fw in workers:
            _ready(fw)
        flower_url = f"http://127.0.0.1:{fport}"
        wait_for(lambda: _ok(flower_url + "/healthcheck"), 30, "Flower to answer")
        yield Fleet(queue, env, flower_url, workers)
    finally:
        for p in procs:  # all at once: each takes a moment to shut down
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            stop(p)
        redis_client.delete(queue, f"{queue}-long")


def _ok(url: str) -> bool:
    try:
        return get(url, 2) == b"OK"
    except (OSError, urllib.error.URLError):
        return False


@pytest.fixture(scope="module")
def job(fleet, difflabel, Session, model, tmp_path_factory, redis_client) -> dict:
    """The job, run with its queue paused until its depth has been scraped."""
    from celery import Celery

    folder = tmp_path_factory.mktemp("fleet-images")
    for i, src in enumerate(digit_pngs(N_IMAGES)):
        (folder / f"img{i:02d}.png").write_bytes(src.read_bytes())
    nodes = [fw.node for fw in fleet.workers]
    control = Celery(broker=REDIS_URL)
    try:
        replies = control.control.cancel_consumer(fleet.queue, destination=nodes, reply=True, timeout=10)
        assert len(replies) == 2, replies
        r = difflabel("submit", folder, "--labels", ",".join(LABELS), "--model", model, *FAST, "--no-progress",
                      env=fleet.env)
        assert r.code == 0, r
        job_id = int(r.last_line)
        depth_redis = redis_client.llen(fleet.queue)
        paused = [scrape(fw.port) for fw in fleet.workers]
        replies = control.control.add_consumer(fleet.queue, destination=nodes, reply=True, timeout=10)
        assert len(replies) == 2, replies
    finally:
        control.close()
    wait_for(lambda: job_finished(Session, job_id), 120, "the job to finish")
    finished_at = time.time()
    after = [scrape(fw.port) for fw in fleet.workers]
    st = difflabel("status", job_id, "-o", "json", env=fleet.env)
    table = difflabel("status", job_id, env=fleet.env)
    with Session() as s:
        evals = s.scalar(select(func.sum(Item.n_evals)).where(Item.job_id == job_id))
    return {"id": job_id, "depth_redis": depth_redis, "paused": paused, "after": after, "status": st,
            "table": table, "finished_at": finished_at, "evals": int(evals),
            "items": items_of(Session, job_id), "score_rows": n_score_rows(Session, job_id)}


def test_queue_depth_is_read_from_the_broker_at_scrape_time(fleet, job):
    tasks = math.ceil(N_IMAGES / ITEMS_PER_TASK)
    assert job["depth_redis"] == tasks  # the job's first round tasks, waiting
    for m in job["paused"]:
        assert metric(m, "difflabel_queue_depth", queue=fleet.queue) == tasks
        assert metric(m, "difflabel_broker_up") == 1
    for m in job["after"]:  # read again at each scrape: drained
        assert metric(m, "difflabel_queue_depth", queue=fleet.queue) == 0


def test_worker_metrics_add_up_to_the_stored_job(fleet, job):
    items = job["items"].values()
    assert all(it.status == "done" for it in items) and len(items) == N_IMAGES
    after = job["after"]
    total = lambda name, **kw: sum(metric(m, name, **kw) for m in after)  # noqa: E731
    assert total("difflabel_items_finished_total", outcome="done") == N_IMAGES
    assert total("difflabel_items_finished_total", outcome="failed") == 0
    assert total("difflabel_evaluations_total") == job["evals"] == sum(it.n_evals for it in items)
    assert total("difflabel_item_rounds_total") == job["score_rows"]
    assert any(metric(m, "difflabel_rounds_total") > 0 for m in after), "no worker ran a round"
    for fw, m in zip(fleet.workers, after):
        # Which worker takes which task is the broker's choice (on a loaded machine one worker
        # may drain the queue alone): each worker's figures must hold for what it did.
        assert metric(m, "difflabel_rounds_total") <= metric(m, "difflabel_item_rounds_total")
        assert (metric(m, "difflabel_rounds_total") == 0) == (metric(m, "difflabel_evaluations_total") == 0)
        assert metric(m, "difflabel_model_load_seconds_count") == 1  # loaded once, kept
        assert metric(m, "difflabel_model_load_seconds_sum") > 0
        from worker.config import ScoringConfig

        assert metric(m, "difflabel_batch_size") == (fw.batch or ScoringConfig().batch_size)
        assert not any(name.startswith("difflabel_device_memory") for name, _ in m), "CPU: no device memory"
        assert metric(m, "process_resident_memory_bytes") > 0
    for m in job["paused"]:  # nothing had run yet
        assert metric(m, "difflabel_evaluations_total") == 0


def test_status_shows_each_workers_throughput(fleet, job):
    r = job["status"]
    assert r.code == 0, r
    s = json.loads(r.stdout)
    ws = {w["node"]: w for w in s["workers"]}
    # Status lists the workers that committed rounds of the job (the broker decides which did).
    worked_nodes = {fw.node for fw, m in zip(fleet.workers, job["after"]) if metric(m, "difflabel_rounds_total") > 0}
    assert worked_nodes and set(ws) == worked_nodes, s["workers"]
    assert sum(w["items_done"] for w in ws.values()) == s["done"] == N_IMAGES
    assert sum(w["items_failed"] for w in ws.values()) == s["failed"] == 0
    assert sum(w["evaluations"] for w in ws.values()) == s["evaluations"] == job["evals"]
    assert sum(w["item_rounds"] for w in ws.values()) == job["score_rows"]
    for fw, m in zip(fleet.workers, job["after"]):  # the store and the worker's own metrics agree
        if fw.node not in ws:
            continue
        w = ws[fw.node]
        assert w["items_done"] == metric(m, "difflabel_items_finished_total", outcome="done")
        assert w["evaluations"] == metric(m, "difflabel_evaluations_total")
        assert w["rounds"] == metric(m, "difflabel_rounds_total")
        first, last = (datetime.fromisoformat(w[k]) for k in ("first_seen", "last_seen"))
        worked = (last - first).total_seconds()
        assert 0 < worked < 120
        assert last.timestamp() <= job["finished_at"] + 1
        # Seen within the last minute: a recent rate, no higher than its rate while it worked.
        # (a worker may have run only rounds that finished no item: then its item rate is 0)
        assert (w["items_per_second"] > 0) == (w["items_done"] > 0)
        assert 0 <= w["items_per_second"] <= w["items_done"] / worked + 1e-9
        assert 0 < w["evals_per_second"] <= w["evaluations"] / worked + 1e-9
        assert w["mean_items_per_second"] == pytest.approx(w["items_done"] / worked)
    table = job["table"]
    assert table.code == 0, table
    assert f"workers    {len(ws)}; rates while it worked" in table.stdout, table
    for fw in fleet.workers:
        if fw.node not in ws:
            continue
        line = next(ln for ln in table.stdout.splitlines() if fw.node in ln)
        assert f" {ws[fw.node]['items_done']} " in line and "ago" in line, line


def test_flower_shows_the_workers_and_their_round_tasks(fleet, job):
    nodes = {fw.node for fw in fleet.workers}
    workers = get_json(f"{fleet.flower}/api/workers?refresh=1")  # Celery's inspect, through Flower
    assert nodes <= set(workers), sorted(workers)
    ran = 0
    for node in nodes:
        info = workers[node]
        assert fleet.queue in {q["name"] for q in info["active_queues"]}
        ran += info["stats"]["total"].get("difflabel.round", 0)
    alive = get_json(f"{fleet.flower}/api/workers?status=1")  # from the workers' heartbeat events
    assert all(alive.get(n) is True for n in nodes), alive

    tasks = get_json(f"{fleet.flower}/api/tasks?taskname=difflabel.round")  # from the task events
    ours = {tid: t for tid, t in tasks.items() if t.get("worker") in nodes}
    assert len(ours) == ran, (len(ours), ran)  # every round task the workers ran
    of_job = [t for t in ours.values() if t["args"].startswith(f"[{job['id']}, ")]  # args: [job, messages]
    assert len(of_job) >= math.ceil(N_IMAGES / ITEMS_PER_TASK)  # at least the first round's tasks
    assert {t["worker"] for t in of_job} == nodes
    assert all(t["state"] == "SUCCESS" for t in of_job)
    # Follow-ups are queued by the workers, with a task-sent event: Flower saw them queued.
    assert any(t.get("sent") for t in of_job)


def test_flower_keeps_a_worker_in_a_long_round_alive(fleet, difflabel, Session, model, tmp_path):
    """The solo pool runs a task on the thread that sends Celery's heartbeats; worker.events
    keeps them going, so Flower does not show a busy worker offline (it expects one every
    2 s and gives up after 4)."""
    (tmp_path / "one.png").write_bytes(digit_pngs(1)[0].read_bytes())
    r = difflabel("submit", tmp_path, "--labels", ",".join(LABELS), "--model", model, "--no-progress",
                  "--min-scores", str(LONG_ROUND_SAMPLES), "--max-scores", str(LONG_ROUND_SAMPLES),
                  "--max-round-evals", str(4 * LONG_ROUND_SAMPLES),
                  env={**fleet.env, "DIFFLABEL_QUEUE": f"{fleet.queue}-long"})  # the capped worker's
    assert r.code == 0, r
    job_id = int(r.last_line)
    holder = wait_for(lambda: _holder(Session, job_id), 30, "the worker to take the item")
    fw = fleet.workers[0]
    assert holder.split(":")[1] == str(fw.proc.pid), holder
    node = fw.node
    started = time.monotonic()
    seen = []
    while not job_finished(Session, job_id):
        if time.monotonic() - started > 4.5:  # past Flower's 4 s: only the extra heartbeats count
            seen.append(get_json(f"{fleet.flower}/api/workers?status=1").get(node))
        time.sleep(0.25)
    busy = time.monotonic() - started
    assert len(seen) >= 3, f"the round took {busy:.1f} s: too short to tell (make LONG_ROUND_SAMPLES larger)"
    assert all(v is True for v in seen), seen


#: Samples per class of the long round: one round of 4 x this many evaluations, at 16 rows
#: per model call (7 to 30 s on a 2-core machine, depending on what else runs).
LONG_ROUND_SAMPLES = int(os.environ.get("DIFFLABEL_IT_LONG_ROUND", "2000"))


def _holder(Session, job_id: int) -> str | None:
    with Session() as s:
        return s.scalar(select(Item.lease_owner).where(Item.job_id == job_id))


def test_a_metrics_port_in_use_is_refused_with_one_line(fleet, difflabel):
    taken = fleet.workers[0].port
    r = difflabel("worker", "--metrics-port", taken, "--hostname", "refused@it", env=fleet.env, timeout=120)
    assert r.code == 2, r
    assert r.stderr.strip() == (f"error: metrics port {taken} is in use: give each worker its own "
                                "--metrics-port (or 0 to turn metrics off)"), r
    r = difflabel("worker", "--metrics-port", "70000", env=fleet.env)
    assert r.code == 2 and "70000 is not in the range 0<=x<=65535" in r.stderr and "Traceback" not in r.stderr, r
