"""The state machine (orchestrator.lifecycle) against the real Postgres store: each requeue
path leaves live leases alone, a job finishes in the same transaction as its last item and
never while a resume is adding items, a commit racing a requeue keeps its round, a worker's
follow-ups go to the job's own queue, and the transitions are driven the way the executors
drive them (real ``run_round`` on the tiny model)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import select

from orchestrator import jobs, lifecycle
from orchestrator.schema import Item, Job, utcnow
from orchestrator.settings import Settings
from worker.config import ScoringConfig
from worker.messages import Message, RoundTask
from worker.rounds import ItemRounds

pytestmark = pytest.mark.integration

LABELS = ["cat", "dog", "bird", "fish"]
CONFIG = ScoringConfig(min_scores=4, max_scores=8, samples_per_round=2, p_cutoff=1e-12)


def new_job(Session, n: int, queue: str = "q-test") -> tuple[int, list[Message]]:
    with Session.begin() as s:
        job = jobs.create_job(s, source=f"/tmp/{uuid.uuid4().hex}", model="demo", template="a {}", labels=LABELS,
                              prompts=[f"a {x}" for x in LABELS], config=CONFIG)
        job.queue = queue
        jobs.add_items(s, job, [(f"/tmp/img{i}.png", None, None) for i in range(n)])
        job_id = job.id
    with Session() as s:
        return job_id, jobs.pending_messages(s, job_id)


def claim(Session, job_id, msgs, owner="W", lease=60.0):
    with Session.begin() as s:
        return lifecycle.claim(s, RoundTask(job_id, tuple(msgs)), owner=owner, lease_seconds=lease, max_attempts=3)


def ctx(job_id, owner="W") -> lifecycle.CommitContext:
    return lifecycle.CommitContext(job_id, LABELS, CONFIG, None, owner, 60.0, 3)


def scored(msgs, rounds_done: int = 0, finish: bool = False) -> list[lifecycle.RoundResult]:
    """Results of round ``rounds_done`` for ``msgs``: class 0 clearly best when ``finish``."""
    out = []
    for m in msgs:
        st = ItemRounds(len(LABELS))
        n = CONFIG.max_scores if finish else CONFIG.min_scores
        errs = np.tile(np.array([[0.1], [0.9], [0.9], [0.9]], np.float32), (1, n)) + \
            np.random.default_rng(m.item_id).random((4, n), dtype=np.float32) * 0.01
        st.record([0, 1, 2, 3], errs, CONFIG)
        out.append(lifecycle.RoundResult(m, (0, 1, 2, 3), errs, st))
    return out


def item(Session, item_id) -> Item:
    with Session() as s:
        return s.get(Item, item_id)


def job_status(Session, job_id) -> str:
    with Session() as s:
        return s.get(Job, job_id).status


def test_requeue_paths_leave_live_leases_alone(Session):
    job_id, msgs = new_job(Session, 4)
    held, free = msgs[:2], msgs[2:]
    assert sorted(claim(Session, job_id, held).items) == [m.item_id for m in held]
    before = {m.item_id: item(Session, m.item_id).token for m in held}
    with Session.begin() as s:
        lost = lifecycle.requeue_lost(s, job_id, stale_before=utcnow() + timedelta(hours=1))
        res = lifecycle.resume(s, job_id, max_attempts=3)
        rescued = lifecycle.rescue_expired(s, job_id, max_attempts=3)
    assert {m.item_id for m in lost} == {m.item_id for m in free}  # only items nobody holds
    assert {m.item_id for m in res.msgs} == {m.item_id for m in free} and not res.solo
    assert len(rescued) == 0
    assert {m.item_id: item(Session, m.item_id).token for m in held} == before
    with Session.begin() as s:  # the holder's round still commits
        done = lifecycle.commit(s, ctx(job_id), scored(held))
    assert not done.stale and len(done.next) == 2


def test_cancel_waits_for_leased_items_and_keeps_their_round(Session):
    job_id, msgs = new_job(Session, 3)
    claim(Session, job_id, msgs[:1])
    with Session.begin() as s:
        c = lifecycle.cancel(s, job_id)
    assert (c.was, c.cancelled, c.in_flight) == ("running", 2, 1)
    with Session.begin() as s:
        done = lifecycle.commit(s, ctx(job_id), scored(msgs[:1]))
    it = item(Session, msgs[0].item_id)
    assert done.next == [] and it.status == "cancelled" and it.round == 1 and it.n_evals == 16
    assert it.lease_owner is None and it.token is None
    with Session.begin() as s:
        again = lifecycle.cancel(s, job_id)
    assert again.was == "cancelled" and again.cancelled == 0
    with Session.begin() as s:  # resume: every item back, the cancelled one from round 1
        res = lifecycle.resume(s, job_id, max_attempts=3)
    assert sorted((m.item_id, m.round) for m in res.msgs) == sorted(
        [(msgs[0].item_id, 1)] + [(m.item_id, 0) for m in msgs[1:]])
    assert job_status(Session, job_id) == "running"


def test_job_finishes_in_the_same_transaction_as_its_last_item(Session):
    job_id, msgs = new_job(Session, 2)
    claim(Session, job_id, msgs)
    with Session.begin() as s:
        lifecycle.commit(s, ctx(job_id), scored(msgs[:1], finish=True))
        assert s.get(Job, job_id).status == "running"
    with Session.begin() as s:
        done = lifecycle.commit(s, ctx(job_id), scored(msgs[1:], finish=True))
        assert done.job_status == "done"  # decided inside the commit, under the job's lock
    assert job_status(Session, job_id) == "done"


def test_job_is_not_finished_while_a_resume_adds_items(Session):
    """The last old item finishes while `submit --resume` is inserting new ones: the job may
    finish for a moment, but the resume's own transaction runs it again with the new items."""
    job_id, msgs = new_job(Session, 1)
    claim(Session, job_id, msgs)
    inserted, go_on = threading.Event(), threading.Event()
    box: dict = {}

    def resume():
        with Session.begin() as s:  # the listing transaction: new rows, not yet visible
            jobs.add_items(s, s.get(Job, job_id), [(f"/tmp/new{i}.png", None, None) for i in range(3)])
            inserted.set()
            go_on.wait(30)
        with Session.begin() as s:
            box["r"] = lifecycle.resume(s, job_id, max_attempts=3)

    t = threading.Thread(target=resume)
    t.start()
    assert inserted.wait(30)
    with Session.begin() as s:
        lifecycle.commit(s, ctx(job_id), scored(msgs, finish=True))  # the last visible item
    go_on.set()
    t.join(30)
    assert len(box["r"].msgs) == 3
    assert job_status(Session, job_id) == "running"


def test_commit_racing_a_requeue_keeps_its_round(Session):
    """A requeue that reads the items while a worker commits their round: the requeue skips
    rows the commit has locked, so the round stays committed and its follow-up live."""
    job_id, msgs = new_job(Session, 2)  # nobody leases them (the embedded executor takes none)
    locked, release = threading.Event(), threading.Event()
    box: dict = {}

    def commit():
        with Session.begin() as s:
            lifecycle.lock_items(s, [m.item_id for m in msgs])  # the commit holds the rows...
            locked.set()
            release.wait(30)
            box["done"] = lifecycle.commit(s, ctx(job_id, owner=None), scored(msgs))

    t = threading.Thread(target=commit)
    t.start()
    assert locked.wait(30)
    with Session.begin() as s:
        s.get(Job, job_id)  # ...while the sweep requeues what nobody seems to hold
        lost = lifecycle.requeue_lost(s, job_id, stale_before=utcnow() + timedelta(hours=1))
    release.set()
    t.join(30)
    assert lost == [] and not box["done"].stale
    assert all(item(Session, m.item_id).round == 1 for m in msgs)


def test_worker_side_release_charges_nothing_and_sends_elsewhere(Session):
    job_id, msgs = new_job(Session, 3)
    claim(Session, job_id, msgs)
    with Session.begin() as s:
        back = lifecycle.release(s, job_id, msgs, owner="W", lease_seconds=60, reason="cannot load model")
    assert len(back) == 3
    for m in back:
        it = item(Session, m.item_id)
        assert it.attempts == 0 and it.rescues == 0 and "cannot load model" in it.error
        assert it.lease_owner == "W" and it.lease_token != it.token  # handing off
    got = claim(Session, job_id, back, owner="X")  # another worker takes the new messages
    assert sorted(got.items) == [m.item_id for m in msgs]
    with Session.begin() as s:
        assert lifecycle.end_handoff(s, back, "W") == 0  # X holds them now: nothing to end


def test_follow_ups_go_to_the_jobs_own_queue(Session, database_url, redis_client, make_images, tmp_path,
                                             model):
    """A worker consuming queues a and b (`worker -Q a,b`) sends a job's follow-up rounds to
    that job's queue, not to the first queue it consumes."""
    from worker import celery_app
    from worker.driver import run_task
    from worker.round import Runtime

    qa, qb = f"qa-{uuid.uuid4().hex[:6]}", f"qb-{uuid.uuid4().hex[:6]}"
    paths = make_images(tmp_path / "queues", 2)
    with Session.begin() as s:
        job = jobs.create_job(s, source=str(tmp_path), model=model, template="a {}", labels=LABELS,
                              prompts=[f"a {x}" for x in LABELS], config=CONFIG)
        job.queue = qb
        jobs.add_items(s, job, [(str(p), None, None) for p in paths])
        job_id = job.id
    with Session() as s:
        msgs = jobs.pending_messages(s, job_id)
    url = redis_client.connection_pool.connection_kwargs
    broker = f"redis://{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}/{url.get('db', 0)}"
    settings = Settings(database_url=database_url, broker_url=broker, queue=qa, device="cpu", task_seconds=0)
    app = celery_app.app_for(settings)
    rt = Runtime(settings)
    try:
        run_task(rt, RoundTask(job_id, tuple(msgs)), celery_app._sender(app, rt), seconds=0)
        assert redis_client.llen(qb) == 1 and redis_client.llen(qa) == 0
    finally:
        redis_client.delete(qa, qb)
    with Session() as s:
        rows = s.scalars(select(Item).where(Item.job_id == job_id)).all()
    assert all(r.round == 1 and r.lease_owner is None for r in rows)  # handoffs ended once sent


def test_an_expired_lease_is_rescued_once_and_only_a_lone_death_is_charged(Session):
    job_id, msgs = new_job(Session, 3)
    claim(Session, job_id, msgs[:2], owner="batch")  # two items held together
    claim(Session, job_id, msgs[2:], owner="alone")  # one held alone
    with Session.begin() as s:
        for m in msgs:
            s.get(Item, m.item_id).lease_expires_at = utcnow() - timedelta(seconds=1)  # both workers died
    with Session.begin() as s:
        first = lifecycle.rescue_expired(s, job_id, max_attempts=3)
    with Session.begin() as s:
        second = lifecycle.rescue_expired(s, job_id, max_attempts=3)
    assert len(first) == 3 and len(second) == 0  # requeued once, not at every sweep
    assert sorted(m.item_id for m in first.solo) == [m.item_id for m in msgs]  # all run alone next
    rows = {m.item_id: item(Session, m.item_id) for m in msgs}
    assert [(r.attempts, r.rescues, r.lease_owner) for r in rows.values()] == \
           [(0, 1, None), (0, 1, None), (1, 0, None)]
    assert "died while processing this item alone" in rows[msgs[2].item_id].error


def test_status_shows_how_many_classes_survive_per_unfinished_item(Session):
    from sqlalchemy import update

    job_id, msgs = new_job(Session, 7)
    left = [4, 4, 3, 2, 1, 1, 1]  # pending items with 4, 3, 2 and 1 classes left
    with Session.begin() as s:
        for m, k in zip(msgs, left):
            s.execute(update(Item).where(Item.id == m.item_id).values(n_survivors=k))
        s.execute(update(Item).where(Item.id == msgs[-1].item_id).values(status="done"))  # not counted
    with Session() as s:
        hist = jobs.survivor_histogram(s, job_id)
        summary = jobs.status_summary(s, s.get(Job, job_id))
    assert hist == {"3-4": 3, "2": 1, "1": 2}
    assert summary["survivors_histogram"] == hist
