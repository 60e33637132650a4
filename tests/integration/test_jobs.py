"""Jobs end to end through the CLI: real Postgres, Redis, a Celery worker process.

The worker scores with the tiny 8x8 pixel model; the scoring settings are small
(4 samples per class, then 2 per round up to 12), so a job of a handful of images
takes seconds.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from itsupport import (FAST, LABELS, PRUNY, corrupt_png_bytes, digit_pngs, items_of, job_finished, job_of,
                       scores_of, wait_for)
from worker.classifier import classify_images
from worker.config import ScoringConfig
from worker.rounds import ItemRounds

pytestmark = pytest.mark.integration

RESULT_FIELDS = {"uri", "label", "confidence", "margin", "n_evals", "status"}


def submit_args(source, model, *extra) -> list[str]:
    return ["submit", str(source), "--labels", ",".join(LABELS), "--model", model, *FAST,
            "--no-progress", *extra]


def check_rounds(item, rows, config: ScoringConfig, n_classes: int) -> ItemRounds:
    """Replay an item's stored rounds and check them against what the scheduler must do:
    every round 0..round-1 present, each scoring exactly the survivors of the one before
    with the planned number of samples, pruned classes never scored again, and the
    item's stored survivors, evaluations and label equal to the replay's."""
    rounds = sorted({r for r, _, _ in rows})
    assert item.round >= 1
    assert rounds == list(range(item.round)), f"{item.uri}: rounds {rounds}, item.round {item.round}"
    state = ItemRounds(n_classes)
    scored: dict[int, list[int]] = {}
    for r in rounds:
        part = [(k, e) for rr, k, e in rows if rr == r]
        scored[r] = [k for k, _ in part]
        assert scored[r] == sorted(state.survivors), \
            f"{item.uri} round {r}: scored {scored[r]}, survivors were {state.survivors}"
        n = state.plan(config)
        assert all(len(e) == n for _, e in part), f"{item.uri} round {r}: expected {n} samples per class"
        state.record(scored[r], np.stack([e.astype(np.float64) for _, e in part]), config)
    for r in rounds:  # a class pruned after round r gets no score rows in any later round
        pruned = set(scored[r]) - set(state.history[r])
        assert not pruned & {k for rr, k, _ in rows if rr > r}, f"{item.uri}: pruned {pruned} scored again"
    assert state.finished(config), f"{item.uri} is done but its rounds say it is not finished"
    assert sorted(item.survivors) == sorted(state.survivors)
    assert item.n_survivors == len(state.survivors)
    assert item.n_evals == state.n_evals == sum(len(e) for _, _, e in rows)
    assert item.label_idx == state.winner()
    return state


def test_folder_job_distributed_end_to_end(worker, difflabel, Session, model, make_images, tmp_path):
    folder = tmp_path / "photos"
    good = make_images(folder, 6)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(corrupt_png_bytes())
    text_png = folder / "text.png"
    text_png.write_text("this is not a picture\n")
    (folder / "notes.txt").write_text("shopping list\n")

    r = difflabel(*submit_args(folder, model, *PRUNY, "--wait", "--timeout", "120"))
    assert r.code == 3, r  # partial: the bad items fail, the rest are labelled
    assert r.last_line.isdigit(), r
    job_id = int(r.last_line)
    assert "Traceback" not in r.stderr, r
    worker.alive()

    job = job_of(Session, job_id)
    items = items_of(Session, job_id)
    config = ScoringConfig.from_dict(job.params)
    assert (config.min_scores, config.max_scores, config.samples_per_round) == (4, 12, 2)
    assert job.status == "partial"
    assert job.finished_at is not None
    assert job.n_skipped == 1  # notes.txt: counted, no item
    assert not any(u.endswith("notes.txt") for u in items)
    bad = [str(corrupt.resolve()), str(text_png.resolve())]
    assert set(items) == {str(p) for p in good} | set(bad)
    assert job.n_items == len(items) == 8

    done = [items[str(p)] for p in good]
    pruned_somewhere = False
    for it in done:
        assert it.status == "done", (it.uri, it.status, it.error)
        assert it.label in LABELS and it.label == LABELS[it.label_idx]
        assert 0.0 <= it.confidence <= 1.0
        assert it.error is None and it.token is None and it.finished_at is not None
        rows = scores_of(Session, it.id)
        state = check_rounds(it, rows, config, len(LABELS))
        pruned_somewhere |= len(state.survivors) < len(LABELS)
    # Not vacuous: at this cutoff the tiny model prunes classes on some items.
    assert pruned_somewhere, "no class was pruned: the pruning checks above tested nothing"

    for uri in bad:
        it = items[uri]
        assert it.status == "failed"
        assert it.label is None and it.n_evals == 0
        assert it.error and "\n" not in it.error and Path(uri).name in it.error, it.error
        assert scores_of(Session, it.id) == []

    r = difflabel("status", job_id, "-o", "json")
    assert r.code == 3, r
    summary = json.loads(r.stdout)
    assert summary["status"] == "partial"
    assert (summary["items"], summary["done"], summary["failed"], summary["remaining"]) == (8, 6, 2, 0)
    assert summary["done"] + summary["failed"] == job.n_items
    assert summary["skipped_objects"] == 1
    assert summary["evaluations"] == sum(it.n_evals for it in done)

    r = difflabel("status", job_id)  # the table people read
    assert r.code == 3 and f"job {job_id}: partial" in r.stdout and "done 6, failed 2" in r.stdout, r
    r = difflabel("list", "-o", "json")
    assert r.code == 0, r
    listed = {row["job"]: row for row in json.loads(r.stdout)}
    assert (listed[job_id]["status"], listed[job_id]["done"], listed[job_id]["failed"]) == ("partial", 6, 2)

    r = difflabel("results", job_id, "-o", "csv")
    assert r.code == 0, r
    reader = csv.DictReader(io.StringIO(r.stdout))
    assert RESULT_FIELDS <= set(reader.fieldnames)
    csv_rows = {row["uri"]: row for row in reader}
    r = difflabel("results", job_id, "-o", "jsonl")
    assert r.code == 0, r
    jsonl_rows = {row["uri"]: row for row in map(json.loads, r.stdout.splitlines())}
    for rows in (csv_rows, jsonl_rows):
        assert set(rows) == set(items)
        for uri, row in rows.items():
            assert RESULT_FIELDS <= set(row)
            it = items[uri]
            assert row["status"] == it.status
            assert int(row["n_evals"]) == it.n_evals
            assert (row["label"] or None) == it.label
    assert {u for u, row in jsonl_rows.items() if row["error"]} == set(bad)

    r = difflabel("results", job_id, "--failed", "-o", "jsonl")
    assert sorted(json.loads(line)["uri"] for line in r.stdout.splitlines()) == sorted(bad)


def test_local_and_distributed_executors_agree(worker, difflabel, Session, model, make_images, tmp_path):
    """One algorithm, two executors: same seed, same labels and the very same scores."""
    from orchestrator import db

    folder = tmp_path / "same"
    good = make_images(folder, 5, start=3)
    (folder / "broken.png").write_bytes(corrupt_png_bytes(1))
    args = submit_args(folder, model, *PRUNY, "--seed", "7")

    sqlite_url = f"sqlite:///{tmp_path / 'local.db'}"
    local = difflabel(*args, "--local", env={"DIFFLABEL_DATABASE_URL": sqlite_url})
    assert local.code == 3, local
    dist = difflabel(*args, "--wait", "--timeout", "120")
    assert dist.code == 3, dist

    LocalSession = db.sessions(sqlite_url)
    a = items_of(LocalSession, int(local.last_line))
    b = items_of(Session, int(dist.last_line))
    assert set(a) == set(b) and len(a) == 6
    for uri in a:
        x, y = a[uri], b[uri]
        assert (x.status, x.label, x.label_idx, x.n_evals, x.round, sorted(x.survivors)) == \
               (y.status, y.label, y.label_idx, y.n_evals, y.round, sorted(y.survivors)), uri
        assert x.confidence == y.confidence and x.margin == y.margin, uri
        assert x.error == y.error
        sa, sb = scores_of(LocalSession, x.id), scores_of(Session, y.id)
        assert [(r, k) for r, k, _ in sa] == [(r, k) for r, k, _ in sb], uri
        for (r, k, ea), (_, _, eb) in zip(sa, sb):
            assert np.array_equal(ea, eb), f"{uri} round {r} class {k}: scores differ"

    # The in-process classifier (`difflabel classify`'s engine) on the same absolute paths.
    from worker.backends import load_backend
    from worker.classifier import classify_images
    from worker.images import decode

    job = job_of(Session, int(dist.last_line))
    backend = load_backend(model, device="cpu")
    images = [(str(p), decode(p)) for p in good]
    prompts = [job.template.replace("{}", lab) for lab in LABELS]
    # Noise is keyed by image content, so the in-process engine matches the jobs exactly.
    from worker.noise import content_key

    results = classify_images(backend, images, prompts, LABELS, ScoringConfig.from_dict(job.params),
                              noise_keys=[content_key(p.read_bytes()) for p in good])
    assert [res.key for res in results] == [str(p) for p in good]
    for res in results:
        y = b[res.key]
        assert (res.label, res.n_evals, res.rounds) == (y.label, y.n_evals, y.round), res.key
        assert res.survivors[-1] == [LABELS[k] for k in sorted(y.survivors)], res.key
        # Bit-identical, not within a tolerance: errors are float32 end to end (engine, store).
        assert res.confidence == y.confidence and res.margin == y.margin, res.key
        stored = {}
        for r, k, e in scores_of(Session, y.id):
            stored.setdefault(k, []).append(e)
        assert res.scores == {LABELS[k]: float(np.mean(np.concatenate(v).astype(np.float64)))
                              for k, v in stored.items()}, res.key


def test_pooled_rule_and_split_rounds_agree_across_executors(worker, difflabel, Session, model, make_images,
                                                             tmp_path):
    """The pooled rule with rounds split into class ranges (2 evaluations per stored round):
    a distributed job stores more, smaller rounds, yet decides exactly as the in-process
    classifier that scores each round whole."""
    folder = tmp_path / "split"
    good = make_images(folder, 4, start=11)
    split = ["--rule", "pooled", "--screen-keep", "0.5", "--screen-min", "2", "--max-round-evals", "2",
             "--seed", "5"]
    dist = difflabel(*submit_args(folder, model, *PRUNY, *split), "--wait", "--timeout", "120")
    assert dist.code == 0, dist
    job = job_of(Session, int(dist.last_line))
    config = ScoringConfig.from_dict(job.params)
    assert (config.rule, config.max_round_evals, config.screen_keep) == ("pooled", 2, 0.5)
    b = items_of(Session, job.id)

    from worker.backends import load_backend
    from worker.images import decode
    from worker.noise import content_key

    backend = load_backend(model, device="cpu")
    whole = ScoringConfig.from_dict({**job.params, "max_round_evals": 0})
    prompts = [job.template.replace("{}", lab) for lab in LABELS]
    results = classify_images(backend, [(str(p), decode(p)) for p in good], prompts, LABELS, whole,
                              noise_keys=[content_key(p.read_bytes()) for p in good])
    for res in results:
        y = b[res.key]
        rows = scores_of(Session, y.id)
        per_round: dict[int, list[int]] = {}
        for r, _, e in rows:
            per_round.setdefault(r, []).append(len(e))
        # at most 2 evaluations per stored round, or one class when its samples alone are more
        assert all(sum(n) <= 2 or len(n) == 1 for n in per_round.values()), per_round
        assert y.round == len(per_round) > res.rounds  # split into more stored rounds
        assert (res.label, res.n_evals) == (y.label, y.n_evals), res.key
        assert res.survivors[-1] == [LABELS[k] for k in sorted(y.survivors)], res.key
        # other batches (float noise only): the same decisions, scores equal to float precision
        assert res.confidence == pytest.approx(y.confidence, abs=1e-3) and \
            res.margin == pytest.approx(y.margin, rel=1e-3, abs=1e-6)


def test_cancel_drops_queued_rounds(worker, difflabel, Session, model, make_images, tmp_path,
                                    idle_queue, queue, redis_client):
    folder = tmp_path / "cancel"
    make_images(folder, 3)
    r = difflabel(*submit_args(folder, model), env={"DIFFLABEL_QUEUE": idle_queue})
    assert r.code == 0, r  # queued, not waited for
    job_id = int(r.last_line)
    assert job_of(Session, job_id).status == "running"
    assert {it.status for it in items_of(Session, job_id).values()} == {"pending"}
    assert redis_client.llen(idle_queue) == 1  # 3 items: one round task

    r = difflabel("cancel", job_id)
    assert r.code == 0, r
    assert f"job {job_id} cancelled: 3 items stopped" in r.stdout
    job = job_of(Session, job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    for it in items_of(Session, job_id).values():
        assert it.status == "cancelled" and it.token is None and it.finished_at is not None

    r = difflabel("status", job_id, "-o", "json")
    assert r.code == 1, r
    summary = json.loads(r.stdout)
    assert (summary["status"], summary["cancelled"], summary["remaining"]) == ("cancelled", 3, 0)

    # Now deliver the round task that was queued before the cancel to the real worker.
    raw = redis_client.lindex(idle_queue, 0)
    task_id = json.loads(raw)["headers"]["id"]
    redis_client.rpoplpush(idle_queue, queue)
    wait_for(lambda: f"difflabel.round[{task_id}] succeeded" in worker.log_text(), 60,
             f"the worker to run task {task_id}")
    assert job_of(Session, job_id).status == "cancelled"
    items = items_of(Session, job_id)
    assert {it.status for it in items.values()} == {"cancelled"}
    assert all(it.n_evals == 0 and scores_of(Session, it.id) == [] for it in items.values())


def test_retry_failed_after_fixing_the_file(worker, difflabel, Session, model, make_images, tmp_path):
    folder = tmp_path / "retry"
    make_images(folder, 2)
    bad = folder / "bad.png"
    bad.write_bytes(corrupt_png_bytes(2))
    r = difflabel(*submit_args(folder, model, "--wait", "--timeout", "120"))
    assert r.code == 3, r
    job_id = int(r.last_line)
    before = items_of(Session, job_id)
    assert before[str(bad.resolve())].status == "failed"

    r = difflabel("retry", job_id, "--failed", "--no-progress")  # not fixed yet: fails again
    assert r.code == 0, r
    wait_for(lambda: job_finished(Session, job_id), 90, f"job {job_id} to finish")
    assert job_of(Session, job_id).status == "partial"  # the same file fails again, alone
    assert items_of(Session, job_id)[str(bad.resolve())].status == "failed"

    shutil.copyfile(digit_pngs(12)[-1], bad)  # fix the file
    r = difflabel("retry", job_id, "--failed", "--no-progress")
    assert r.code == 0, r
    assert "1 failed items requeued" in r.stderr
    assert wait_for(lambda: job_finished(Session, job_id), 90, f"job {job_id} to finish") == "done"

    after = items_of(Session, job_id)
    fixed = after[str(bad.resolve())]
    assert fixed.status == "done" and fixed.label in LABELS and fixed.error is None
    assert fixed.n_evals > 0 and fixed.attempts == 0
    assert fixed.n_evals == sum(len(e) for _, _, e in scores_of(Session, fixed.id))
    for uri, it in before.items():  # the items that were done are untouched
        if it.status == "done":
            assert (after[uri].n_evals, after[uri].finished_at, after[uri].label) == \
                   (it.n_evals, it.finished_at, it.label)
    r = difflabel("status", job_id, "-o", "json")
    assert r.code == 0 and json.loads(r.stdout)["failed"] == 0, r
    r = difflabel("retry", job_id, "--failed", "--no-progress")
    assert r.code == 0 and "0 failed items requeued" in r.stderr, r


def test_resume_adds_new_files_and_keeps_finished_ones(worker, difflabel, Session, model, make_images,
                                                       tmp_path):
    folder = tmp_path / "resume"
    first = make_images(folder, 2)
    r = difflabel(*submit_args(folder, model, "--wait", "--timeout", "120"))
    assert r.code == 0, r
    job_id = int(r.last_line)
    before = items_of(Session, job_id)
    scores_before = {u: scores_of(Session, it.id) for u, it in before.items()}
    assert {it.status for it in before.values()} == {"done"}

    new = make_images(folder, 2, start=2)
    r = difflabel("submit", folder, "--resume", job_id, "--no-progress", "--wait", "--timeout", "120")
    assert r.code == 0, r
    assert r.last_line == str(job_id)
    assert "2 new items" in r.stderr, r
    job = job_of(Session, job_id)
    assert job.status == "done" and job.n_items == 4
    after = items_of(Session, job_id)
    assert set(after) == {str(p) for p in first + new}
    for p in new:
        assert after[str(p)].status == "done" and after[str(p)].label in LABELS
    for uri, it in before.items():
        assert (after[uri].n_evals, after[uri].round, after[uri].finished_at) == \
               (it.n_evals, it.round, it.finished_at)
        got = scores_of(Session, it.id)
        assert [(r_, k) for r_, k, _ in got] == [(r_, k) for r_, k, _ in scores_before[uri]]

    # Nothing new: the job stays done and nothing is rescored.
    r = difflabel("submit", folder, "--resume", job_id, "--no-progress", "--wait", "--timeout", "60")
    assert r.code == 0 and "0 new items" in r.stderr, r
    assert {u: it.n_evals for u, it in items_of(Session, job_id).items()} == \
           {u: it.n_evals for u, it in after.items()}

    r = difflabel("submit", tmp_path, "--resume", job_id, "--no-progress")
    assert r.code == 2 and r.stderr.startswith("error:") and str(job_id) in r.stderr, r


def test_cancelled_job_resumes(worker, difflabel, Session, model, make_images, tmp_path, idle_queue,
                               redis_client):
    """Cancel, then resume: the cancelled items are labelled, nothing is lost or redone."""
    folder = tmp_path / "pause"
    make_images(folder, 3, start=4)
    r = difflabel(*submit_args(folder, model, "--wait", "--timeout", "2"), env={"DIFFLABEL_QUEUE": idle_queue})
    assert r.code == 4, r  # nobody consumes the idle queue: --wait gives up
    assert "still running after 2 s" in r.stderr
    job_id = int(r.last_line)
    redis_client.delete(idle_queue)  # that queued task is not ours to run any more
    assert difflabel("cancel", job_id).code == 0

    r = difflabel("submit", folder, "--resume", job_id, "--no-progress", "--wait", "--timeout", "120")
    assert r.code == 0, r
    assert job_of(Session, job_id).status == "done"
    items = items_of(Session, job_id)
    assert len(items) == 3
    for it in items.values():
        assert it.status == "done" and it.label in LABELS, (it.uri, it.status)
        assert it.n_evals == sum(len(e) for _, _, e in scores_of(Session, it.id)) > 0


def test_a_folder_that_is_not_a_model_is_refused_at_submit(difflabel, make_images, tmp_path):
    """A worker that cannot load a model gives its items back uncharged (tests/faults), so a
    folder no worker could load is refused before any job exists."""
    folder = tmp_path / "nomodel"
    make_images(folder, 2)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    r = difflabel(*submit_args(folder, str(not_a_model), "--wait", "--timeout", "120"))
    assert r.code == 2, r
    assert r.stderr.strip().startswith("error: ") and "not a diffusers model directory" in r.stderr, r
