"""At-least-once delivery, exactly-once effects: a round task run twice changes nothing.

The jobs here are submitted through the CLI to a queue nobody consumes, so their first
round task waits in Redis; the tests then run that task's messages themselves with
``worker.round.run_round`` against the real Postgres store (as a worker would), or hand
them to the real worker twice.
"""

from __future__ import annotations

import base64
import json
import threading

import pytest
from sqlalchemy import select

from itsupport import FAST, LABELS, items_of, job_finished, scores_of, wait_for
from orchestrator import jobs, lifecycle
from orchestrator.schema import Item, RoundScores
from orchestrator.settings import Settings
from worker.messages import Message, RoundTask

pytestmark = pytest.mark.integration


def queued_job(difflabel, model, folder, idle_queue, redis_client) -> tuple[int, list[Message], bytes]:
    """Submit ``folder`` to the idle queue and take its round task off the queue; returns
    the job, the task's messages and the raw Redis message."""
    r = difflabel("submit", folder, "--labels", ",".join(LABELS), "--model", model, *FAST,
                  "--no-progress", env={"DIFFLABEL_QUEUE": idle_queue})
    assert r.code == 0, r
    job_id = int(r.last_line)
    raw = redis_client.rpop(idle_queue)  # the one round task (<= 16 items), as Celery sent it
    assert raw is not None and redis_client.llen(idle_queue) == 0
    envelope = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert envelope["headers"]["task"] == "difflabel.round" and args[0] == job_id
    return job_id, [Message.from_list(m) for m in args[1]], raw


def snapshot(Session, job_id: int):
    """Everything a round writes: score rows and the items' progress columns."""
    with Session() as s:
        scores = s.execute(select(RoundScores.item_id, RoundScores.round, RoundScores.classes, RoundScores.errors)
                           .join(Item, Item.id == RoundScores.item_id).where(Item.job_id == job_id)
                           .order_by(RoundScores.item_id, RoundScores.round)).all()
        items = s.execute(select(Item.id, Item.status, Item.round, Item.token, Item.n_evals, Item.survivors,
                                 Item.attempts).where(Item.job_id == job_id).order_by(Item.id)).all()
    return [tuple(r) for r in scores], [tuple(r) for r in items]


@pytest.fixture
def runtime_settings(database_url, idle_queue) -> Settings:
    return Settings(database_url=database_url, queue=idle_queue, device="cpu")


def test_round_task_run_twice_changes_nothing(difflabel, Session, model, make_images, tmp_path,
                                              idle_queue, redis_client, runtime_settings):
    from worker.round import Runtime, run_round

    make_images(tmp_path / "twice", 3)
    job_id, msgs = queued_job(difflabel, model, tmp_path / "twice", idle_queue, redis_client)[:2]
    assert len(msgs) == 3 and {m.round for m in msgs} == {0}

    rt = Runtime(runtime_settings)
    task = RoundTask(job_id, tuple(msgs))
    out = run_round(rt, task)
    nexts = out.next
    assert out.solo == []
    assert sorted(m.item_id for m in nexts) == sorted(m.item_id for m in msgs)
    assert {m.round for m in nexts} == {1}
    first = snapshot(Session, job_id)
    assert len(first[0]) == 3  # round 0 of each item, all its classes in one row, once
    assert all(it[2] == 1 and it[4] == 4 * len(LABELS) for it in first[1])  # round 1 next, 16 evals

    assert run_round(rt, task).next == []  # the same task again: dropped
    again = run_round(Runtime(runtime_settings), task)  # on another worker too
    assert again.next == [] and again.solo == []
    assert snapshot(Session, job_id) == first
    with Session() as s:  # the live messages are the ones run_round handed back
        assert sorted(jobs.pending_messages(s, job_id), key=lambda m: m.item_id) == \
               sorted(nexts, key=lambda m: m.item_id)


def test_same_round_task_run_concurrently_commits_once(difflabel, Session, model, make_images, tmp_path,
                                                       idle_queue, redis_client, runtime_settings,
                                                       monkeypatch):
    from worker.round import Runtime, run_round

    make_images(tmp_path / "race", 3, start=5)
    job_id, msgs = queued_job(difflabel, model, tmp_path / "race", idle_queue, redis_client)[:2]

    # Both deliveries pass the unlocked "is this message live?" read before either commits:
    # only the row lock and token check at commit time can keep the second one out. (A
    # worker's claim at the start of a task normally keeps it out sooner: claim=False
    # tests the guard behind it; tests/faults deliver duplicates through real workers.)
    both_read = threading.Barrier(2, timeout=60)
    import worker.round as round_module

    live_items = round_module._live_items

    def live_items_then_wait(s, m):
        out = live_items(s, m)
        both_read.wait()
        return out

    commits: list[int] = []
    commit = lifecycle.commit

    def counting_commit(s, ctx, results, *a, **kw):
        out = commit(s, ctx, results, *a, **kw)
        commits.append(len(results) - len(out.stale))
        return out

    monkeypatch.setattr(round_module, "_live_items", live_items_then_wait)
    monkeypatch.setattr(lifecycle, "commit", counting_commit)
    runtimes = [Runtime(runtime_settings, leases=False) for _ in range(2)]
    for rt in runtimes:
        rt.backend(model)  # loaded up front, so the two rounds overlap
    results: list = [None, None]
    errors: list[BaseException] = []

    def deliver(i: int) -> None:
        try:
            results[i] = run_round(runtimes[i], RoundTask(job_id, tuple(msgs)), claim=False).next
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(commits) == 2, "both deliveries should have reached the commit"
    assert sorted(commits) == [0, 3]  # each item's round committed by exactly one of them
    assert sorted(len(r) for r in results) == [0, 3]

    scores, items = snapshot(Session, job_id)
    assert len(scores) == 3  # one round row per item
    for item_id, status, rnd, token, n_evals, survivors, attempts in items:
        assert (status, rnd, attempts) == ("pending", 1, 0)  # advanced by exactly one round
        assert n_evals == sum(len(e) for _, _, e in scores_of(Session, item_id)) == 4 * len(LABELS)
    winner = results[0] or results[1]
    assert {(m.item_id, m.token) for m in winner} == {(i[0], i[3]) for i in items}


def test_worker_given_the_same_round_twice(worker, difflabel, Session, model, make_images, tmp_path,
                                           idle_queue, redis_client, service_env):
    """The real worker receives round 0 twice (a redelivery); the job ends as if once."""
    from worker.celery_app import app_for, send_rounds

    make_images(tmp_path / "dup", 3, start=8)
    job_id, msgs = queued_job(difflabel, model, tmp_path / "dup", idle_queue, redis_client)[:2]
    settings = Settings(database_url=service_env["DIFFLABEL_DATABASE_URL"],
                        broker_url=service_env["DIFFLABEL_BROKER_URL"], queue=service_env["DIFFLABEL_QUEUE"])
    app = app_for(settings)
    assert send_rounds(app, settings, job_id, msgs) == 1
    assert send_rounds(app, settings, job_id, msgs) == 1
    assert wait_for(lambda: job_finished(Session, job_id), 90, f"job {job_id} to finish") == "done"
    worker.alive()
    for it in items_of(Session, job_id).values():
        rows = scores_of(Session, it.id)
        assert it.status == "done" and it.label in LABELS
        assert sorted({r for r, _, _ in rows}) == list(range(it.round))
        assert it.n_evals == sum(len(e) for _, _, e in rows)
        assert len([1 for r, _, _ in rows if r == 0]) == len(LABELS)  # round 0 stored once


def test_repair_requeues_a_lost_round_and_the_late_copy_is_dropped(worker, difflabel, Session, model,
                                                                    make_images, tmp_path, idle_queue,
                                                                    redis_client, queue, runtime_settings):
    from worker.round import Runtime, run_round

    make_images(tmp_path / "lost", 2, start=10)
    job_id, lost, _ = queued_job(difflabel, model, tmp_path / "lost", idle_queue, redis_client)
    # The round task is gone from every queue (say Redis restarted): the job would hang.
    # `repair` sends a replacement (to the idle queue for now, so it waits there).
    r = difflabel("repair", job_id, "--stale-after", "0", env={"DIFFLABEL_QUEUE": idle_queue})
    assert r.code == 0, r
    assert f"job {job_id}: requeued 2 items in 1 tasks" in r.stdout, r
    replacement = redis_client.rpop(idle_queue)
    assert replacement is not None

    # The lost task turns up after all, before the replacement runs: same items, same
    # round, only the dispatch token differs. It must change nothing.
    before = snapshot(Session, job_id)
    assert run_round(Runtime(runtime_settings), RoundTask(job_id, tuple(lost))).next == []
    assert snapshot(Session, job_id) == before
    assert before[0] == []  # no scores yet

    redis_client.lpush(queue, replacement)  # the replacement reaches the real worker
    assert wait_for(lambda: job_finished(Session, job_id), 90, f"job {job_id} to finish") == "done"
    for it in items_of(Session, job_id).values():
        assert it.n_evals == sum(len(e) for _, _, e in scores_of(Session, it.id)) > 0
    r = difflabel("repair", job_id)
    assert r.code == 0 and "nothing to repair" in r.stdout, r


def test_claim_leases_skips_live_rescues_expired_and_charges_only_lone_deaths(difflabel, Session, model,
                                                                             make_images, tmp_path, idle_queue,
                                                                             redis_client):
    from datetime import timedelta

    make_images(tmp_path / "claim", 3, start=20)
    job_id, msgs, _ = queued_job(difflabel, model, tmp_path / "claim", idle_queue, redis_client)
    ids = sorted(m.item_id for m in msgs)

    def claim(ms, owner="A", handoff_from=None):
        with Session.begin() as s:
            c = lifecycle.claim(s, RoundTask(job_id, tuple(ms), handoff_from), owner=owner, lease_seconds=60,
                                max_attempts=3)
            return sorted(c.items), c.solo

    def expire(item_ids):  # the holder stopped renewing long ago: it is gone
        with Session.begin() as s:
            for i in item_ids:
                it = s.get(Item, i)
                it.lease_expires_at = it.lease_expires_at - timedelta(seconds=120)

    assert claim(msgs) == (ids, [])
    assert claim(msgs, owner="B") == ([], [])  # a second delivery while A holds the lease: skipped
    assert claim(msgs, owner="B", handoff_from="C") == ([], [])  # only the holder can hand it on
    assert claim(msgs, owner="B", handoff_from="A") == (ids, [])  # A handed it on by name
    expire(ids)
    got, solo = claim(msgs, owner="C")  # B died holding the batch: each item goes out alone,
    assert got == [] and sorted(m.item_id for m in solo) == ids  # uncharged
    items = items_of(Session, job_id)
    assert all(it.attempts == 0 and it.rescues == 1 and it.lease_owner is None for it in items.values())
    assert claim(msgs, owner="C") == ([], [])  # the batch message is obsolete now

    one = [m for m in solo if m.item_id == ids[0]]
    assert claim(one, owner="D") == ([ids[0]], [])  # alone, it runs
    expire([ids[0]])
    assert claim(one, owner="E") == ([ids[0]], [])  # died alone: attempt 1 of 3, runs again
    expire([ids[0]])
    assert claim(one, owner="F") == ([ids[0]], [])  # attempt 2
    expire([ids[0]])
    assert claim(one, owner="G") == ([], [])  # third lone death: failed, with the reason
    it = {i.id: i for i in items_of(Session, job_id).values()}[ids[0]]
    assert it.status == "failed" and it.attempts == 3 and it.error.startswith("failed after 3 attempts")
    assert "died while processing this item alone" in it.error
