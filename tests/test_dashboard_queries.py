"""The status page's queries (orchestrator.dashboard) on a real SQLite store, the embedded
default, checked against the same figures computed in Python from the rows; and the pieces
of `difflabel serve` that need no server: URL masking, bar widths, thumbnails."""

from __future__ import annotations

import io
import random
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image
from sqlalchemy import select, update

from orchestrator import dashboard, db, jobs
from orchestrator.schema import Item, Job
from orchestrator.serve import masked_url
from orchestrator.thumbnails import ThumbnailError, Thumbnails, make_thumbnail
from worker.config import ScoringConfig

LABELS = ["cat", "dog", "bird"]


@pytest.fixture
def store(tmp_path):
    """A SQLite job store with one job of 200 items: 150 labelled, 20 failed, 10 cancelled and
    20 pending, finished over the 10 minutes after the job started; 40 reviewed."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.ensure_schema(url)
    Session = db.sessions(url)
    rng = random.Random(0)
    start = datetime(2026, 3, 1, 12, 0, 7, tzinfo=timezone.utc)
    with Session.begin() as s:
        job = jobs.create_job(s, source="/data", model="m", template="a {}", labels=LABELS,
                              prompts=[f"a {x}" for x in LABELS], config=ScoringConfig())
        job.created_at = start
        jobs.add_items(s, job, [(f"/data/{i}.png", None, None) for i in range(200)])
        job_id = job.id
    rows = {}
    with Session.begin() as s:
        ids = list(s.scalars(select(Item.id).where(Item.job_id == job_id).order_by(Item.id)))
        for n, item_id in enumerate(ids):
            if n >= 180:
                continue  # pending
            at = start + timedelta(seconds=rng.uniform(30, 600))
            if n >= 170:  # cancelled: finished, but not labelled nor failed
                values = dict(status="cancelled", finished_at=at)
            elif n < 150:
                lab = LABELS[n % 3]
                conf = 1.0 if n == 0 else round(rng.random(), 6)
                rev = None if n >= 40 else (lab if n % 4 else LABELS[(n + 1) % 3])
                if n == 39:
                    rev = "other"  # a reviewer's label outside the job's classes
                values = dict(status="done", label=lab, confidence=conf, finished_at=at, reviewed_label=rev)
            else:
                values = dict(status="failed", error="bad image", finished_at=at)
            s.execute(update(Item).where(Item.id == item_id).values(**values))
            rows[item_id] = values
        # finished (the pending items were cancelled, say): its chart ends at its last finish
        s.execute(update(Job).where(Job.id == job_id).values(status="partial", finished_at=start + timedelta(hours=1)))
    return Session, job_id, rows, start


def test_histogram_throughput_confusion_least_confident(store):
    Session, job_id, rows, start = store
    done = {i: r for i, r in rows.items() if r["status"] == "done"}
    with dashboard.read_only(Session) as s:
        job = s.get(Job, job_id)
        h = dashboard.confidence_histogram(s, job_id)
        t = dashboard.throughput_series(s, job)
        c = dashboard.confusion(s, job_id)
        least = dashboard.least_confident(s, job_id, 10)
        summary = dashboard.summary(s, job)

    want = [0] * 20
    for r in done.values():
        want[min(int(r["confidence"] * 1000) // 50, 19)] += 1  # counted in thousandths
    assert h["lo"] == 0 and h["counts"] == want and h["items"] == 150  # 1.0 in the last bin
    confs = sorted(r["confidence"] for r in done.values())
    assert abs(h["median"] - confs[74]) <= 0.002

    # from the job's start (12:00:07) to the last finish (~10 min later), in round bars on the clock
    last = max(r["finished_at"] for r in rows.values())
    w = dashboard.nice_width((last - start).total_seconds())
    assert w in (10, 15) and t["width_s"] == w
    t0 = datetime.fromtimestamp(start.timestamp() // w * w, timezone.utc)
    assert t["start"] == t0.isoformat().replace("+00:00", "Z")
    assert len(t["done"]) == int((last - t0).total_seconds() // w) + 1
    for kind, series in (("done", t["done"]), ("failed", t["failed"])):
        expect = [0] * len(series)
        for r in rows.values():
            if r["status"] == kind:
                expect[int((r["finished_at"] - t0).total_seconds() // w)] += 1
        assert series == expect

    reviewed = {i: r for i, r in done.items() if r["reviewed_label"]}
    assert c["reviewed"] == 40 == len(reviewed)
    assert c["agree"] == sum(r["reviewed_label"] == r["label"] for r in reviewed.values())
    assert c["labels"] == LABELS + ["other"]  # the job's class order, outsiders last
    for a in c["labels"]:
        for b in c["labels"]:
            n = sum(r["label"] == a and r["reviewed_label"] == b for r in reviewed.values())
            assert c["cells"][c["labels"].index(a)][c["labels"].index(b)] == n

    order = sorted(done, key=lambda i: (done[i]["confidence"], i))[:10]
    assert [x["id"] for x in least] == order
    assert summary["items"] == 200 and summary["done"] == 150 and summary["labels"] == LABELS


def test_the_histogram_closes_in_on_confident_jobs(store):
    """A calibrated model sure of everything (0.981-0.999): 20 bins of 0.001 from 0.98."""
    Session, job_id, rows, _ = store
    rng = random.Random(1)
    confs = {}
    with Session.begin() as s:
        for item_id, r in rows.items():
            if r["status"] == "done":
                confs[item_id] = round(rng.uniform(0.981, 0.9999), 6)
                s.execute(update(Item).where(Item.id == item_id).values(confidence=confs[item_id]))
    with dashboard.read_only(Session) as s:
        h = dashboard.confidence_histogram(s, job_id)
    want = [0] * 20
    for c in confs.values():
        want[int(c * 1000) - 980] += 1
    assert (h["lo"], h["counts"], h["items"]) == (0.98, want, 150)
    with Session.begin() as s:  # one unsure item: the whole range again
        s.execute(update(Item).where(Item.id == next(iter(confs))).values(confidence=0.42))
    with dashboard.read_only(Session) as s:
        assert dashboard.confidence_histogram(s, job_id)["lo"] == 0.0


def test_confusion_keeps_the_most_reviewed_labels(store):
    Session, job_id, *_ = store
    with dashboard.read_only(Session) as s:
        c = dashboard.confusion(s, job_id, most=2)
    assert len(c["labels"]) == 2 and c["hidden"] > 0
    assert sum(map(sum, c["cells"])) + c["hidden"] == c["reviewed"]


def test_a_job_with_nothing_finished(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    db.ensure_schema(url)
    Session = db.sessions(url)
    with Session.begin() as s:
        job = jobs.create_job(s, source="/d", model="m", template="a {}", labels=LABELS, prompts=LABELS,
                              config=ScoringConfig())
        jobs.add_items(s, job, [("/d/a.png", None, None)])
        job_id = job.id
    with dashboard.read_only(Session) as s:
        job = s.get(Job, job_id)
        assert dashboard.throughput_series(s, job)["start"] is None
        assert dashboard.confidence_histogram(s, job_id)["items"] == 0
        assert dashboard.confusion(s, job_id)["reviewed"] == 0
        assert dashboard.least_confident(s, job_id) == []
        assert dashboard.item_uri(s, job_id, 10_000) is None


@pytest.mark.parametrize("url, shown", [
    ("postgresql://app:s3cret@db:5432/labels", "postgresql://app:***@db:5432/labels"),
    ("postgresql://app:p%40ss%3Aw@db/labels", "postgresql://app:***@db/labels"),
    ("postgresql://app:a@b@db/labels", "postgresql://app:***@db/labels"),
    ("postgresql://db/labels?user=app&password=s3cret", "postgresql://db/labels?user=app&password=***"),
    ("postgresql://app@db/labels", "postgresql://app@db/labels"),
    ("sqlite:////home/me/.difflabel/difflabel.db", "sqlite:////home/me/.difflabel/difflabel.db"),
])
def test_database_urls_are_shown_without_passwords(url, shown):
    assert masked_url(url) == shown


@pytest.mark.parametrize("span, width", [(1, 1), (59, 1), (61, 2), (600, 10), (3600, 60), (86400, 1800),
                                         (30 * 86400, 43200), (90 * 86400, 2 * 86400)])
def test_bar_widths_are_round(span, width):
    assert dashboard.nice_width(span) == width
    assert span / width <= dashboard.THROUGHPUT_BARS


def test_thumbnails_shrink_cache_and_refuse(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGBA", (400, 100), (200, 10, 10, 128)).save(big)
    small = tmp_path / "small.png"
    Image.new("L", (8, 8), 200).save(small)
    assert Image.open(io.BytesIO(make_thumbnail(big.read_bytes(), "big"))).size == (96, 24)
    thumbs = Thumbnails(max_bytes=10_000)
    looked_up = []

    def uri(p):
        return lambda: looked_up.append(p) or str(p)

    a = thumbs.get(("j", 1), uri(big))
    assert thumbs.get(("j", 1), uri(big)) == a and looked_up == [big]  # made once
    assert Image.open(io.BytesIO(thumbs.get(("j", 2), uri(small)))).size == (8, 8)  # never enlarged
    assert thumbs.get(("j", 3), lambda: None) is None  # not an item: nothing read
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ThumbnailError, match="not an image"):
        thumbs.get(("j", 4), uri(text))
    with pytest.raises(ThumbnailError, match="cannot read"):
        thumbs.get(("j", 5), uri(tmp_path / "gone.png"))
    for i in range(100):  # the cache stays within its budget
        thumbs.get(("k", i), uri(big))
    assert thumbs._bytes <= 10_000 and len(thumbs) < 100
