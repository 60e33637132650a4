"""Per-worker figures without services: the job_workers upsert and its rates on a migrated
SQLite store, the worker's in-memory window, the `status` table and the metrics' defaults."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
import torch

from orchestrator import db, fleet, jobs
from orchestrator.report import print_status
from orchestrator.schema import utcnow
from worker import metrics
from worker.config import ScoringConfig


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert db.upgrade(url) == db.SCHEMA_REVISION  # migration 0007 runs on SQLite too
    Session = db.sessions(url)
    with Session.begin() as s:
        job = jobs.create_job(s, source="src", model="demo", template="a {}", labels=["a", "b"],
                              prompts=["a a", "a b"], config=ScoringConfig())
        job_id = job.id
    yield Session, job_id
    db.get_engine.cache_clear()


def test_commits_add_up_and_rates_cover_the_window(store):
    Session, job_id = store
    t0 = utcnow() - timedelta(seconds=100)
    w = fleet.Window(t0)
    with Session.begin() as s:
        fleet.record(s, job_id, "h:11:aa", "gpu0@h", fleet.Work(1, 4, 3, 1, 400), first_seen=t0, window=w,
                     now=t0 + timedelta(seconds=40))
    with Session.begin() as s:  # 70 s later: the window starts at the first commit's totals
        fleet.record(s, job_id, "h:11:aa", "gpu0@h", fleet.Work(2, 6, 5, 0, 600), first_seen=t0,
                     window=fleet.Window(t0 + timedelta(seconds=40), 4, 400), now=t0 + timedelta(seconds=90))
        fleet.record(s, job_id, "h:12:bb", "gpu1@h", fleet.Work(1, 2, 2, 0, 100), first_seen=t0, window=w,
                     now=t0 + timedelta(seconds=20))
    now = t0 + timedelta(seconds=100)
    with Session() as s:
        rows = {r["node"]: r for r in fleet.job_workers(s, job_id, now=now, window=60)}
    a, b = rows["gpu0@h"], rows["gpu1@h"]
    assert (a["rounds"], a["item_rounds"], a["items_done"], a["items_failed"], a["evaluations"]) == (3, 10, 8, 1, 1000)
    assert a["items_per_second"] == pytest.approx((9 - 4) / 60)  # (now - win_at) = 60 s
    assert a["evals_per_second"] == pytest.approx(600 / 60)
    assert a["mean_items_per_second"] == pytest.approx(9 / 90)
    assert a["seen_seconds_ago"] == pytest.approx(10)
    assert b["items_per_second"] == 0.0  # last seen 80 s ago: nothing recent
    assert b["mean_items_per_second"] == pytest.approx(2 / 20)
    with Session.begin() as s:  # a long round: the heartbeat moves last_seen, nothing else
        assert fleet.touch(s, "h:12:bb", [job_id], now=now) == 1
    with Session() as s:
        b2 = next(r for r in fleet.job_workers(s, job_id, now=now, window=60) if r["node"] == "gpu1@h")
        summary = jobs.status_summary(s, jobs.get_job(s, job_id))
    assert b2["seen_seconds_ago"] == 0 and b2["items_done"] == 2
    assert b2["items_per_second"] == pytest.approx(2 / 100)
    assert [w["node"] for w in summary["workers"]][0] == "gpu1@h"  # most recently seen first

    out = io.StringIO()
    print_status(summary, stream=out)
    text = out.getvalue()
    assert "workers    2; rates over the last minute" in text
    line = next(ln for ln in text.splitlines() if "gpu0@h" in ln)
    assert "(pid 11)" in line and " 8 " in line and "1,000" in line


def test_the_window_keeps_the_newest_reading_a_window_old():
    t0 = utcnow()
    jw = metrics._JobWindow(t0)
    assert jw.window(t0 + timedelta(seconds=5), 60) == fleet.Window(t0, 0, 0)  # young: since the start
    for i in range(1, 11):  # a commit every 10 s, 3 items and 30 evaluations each
        jw.add(t0 + timedelta(seconds=10 * i), 3, 30)
    win = jw.window(t0 + timedelta(seconds=105), 60)
    assert win == fleet.Window(t0 + timedelta(seconds=40), 12, 120)
    assert len(jw.samples) == 7  # older readings dropped


def test_tally_counts_what_was_committed_and_records_only_with_leases(store):
    Session, job_id = store
    from orchestrator.lifecycle import Committed

    before = metrics.EVALUATIONS._value.get()
    for owner in (None, "h:13:cc"):
        tally = metrics.Tally(owner)
        tally.begin(job_id)
        with Session.begin() as s:
            settle = tally.note(s, job_id, Committed(done=2, failed=1, item_rounds=3, evals=30))
        settle()
    assert metrics.EVALUATIONS._value.get() - before == 60
    with Session() as s:
        rows = fleet.job_workers(s, job_id)
    assert [(r["worker"], r["items_done"], r["items_failed"], r["evaluations"]) for r in rows] == \
        [("h:13:cc", 2, 1, 30)]


def test_default_metrics_port_follows_the_cuda_index():
    assert metrics.default_port(torch.device("cpu")) == metrics.DEFAULT_METRICS_PORT
    assert metrics.default_port(torch.device("cuda", 3)) == metrics.DEFAULT_METRICS_PORT + 3
    assert metrics.default_port(torch.device("cuda")) == metrics.DEFAULT_METRICS_PORT
