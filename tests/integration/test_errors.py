"""Bad usage and unreachable services: the documented exit code, one `error:` line on
stderr, no traceback, and no job left behind."""

from __future__ import annotations

import pytest

from itsupport import FAST, n_jobs

pytestmark = pytest.mark.integration

EXIT_USAGE, EXIT_UNAVAILABLE = 2, 69
CLOSED = "127.0.0.1:1"  # nothing listens on port 1


def one_error_line(r, *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r
    assert len(lines) == 1 and lines[0].startswith("error: "), r
    for w in words:
        assert w in lines[0], (w, r)


@pytest.fixture
def folder(make_images, tmp_path):
    make_images(tmp_path / "imgs", 2)
    return tmp_path / "imgs"


@pytest.mark.parametrize("args, words", [
    (["--labels", ""], ["empty"]),
    (["--labels", " , ,"], ["empty"]),
    (["--labels", "cat"], ["only one label", "cat"]),
    (["--labels", "cat,dog,Cat"], ["duplicate", "Cat"]),
    (["--labels", "cat,dog", "--template", "a photo of a cat"], ["{}"]),
    (["--labels", "cat,dog", "--template", "a {} of a {}"], ["{}"]),
    (["--labels", "cat,dog", "--template", "a {} {x}"], ["braces"]),
    ([], ["--labels"]),
    (["--labels", "cat,dog", "--min-scores", "1"], ["min_scores"]),
    (["--labels", "cat,dog", "--min-scores", "8", "--max-scores", "4"], ["max_scores"]),
], ids=["empty", "blank", "one", "duplicate", "no-braces", "two-braces", "other-braces", "no-labels",
        "min-scores", "max-below-min"])
def test_bad_usage_exits_2(difflabel, Session, model, folder, args, words):
    before = n_jobs(Session)
    r = difflabel("submit", folder, "--model", model, "--no-progress", *args)
    assert r.code == EXIT_USAGE, r
    one_error_line(r, *words)
    assert n_jobs(Session) == before


def test_bad_usage_files_and_paths(difflabel, Session, model, folder, tmp_path):
    before = n_jobs(Session)
    comments = tmp_path / "labels.txt"
    comments.write_text("# nothing but a comment\n\n")
    r = difflabel("submit", folder, "--model", model, "--labels-file", comments, "--no-progress")
    assert r.code == EXIT_USAGE, r
    one_error_line(r, "empty")
    r = difflabel("submit", tmp_path / "missing", "--model", model, "--labels", "cat,dog", "--no-progress")
    assert r.code == EXIT_USAGE, r
    one_error_line(r, "missing")
    r = difflabel("submit", folder, "--model", tmp_path / "no-model", "--labels", "cat,dog", "--no-progress")
    assert r.code == EXIT_USAGE, r
    one_error_line(r, "no-model")
    r = difflabel("status", "999999")
    assert r.code == EXIT_USAGE, r
    one_error_line(r, "999999")
    assert n_jobs(Session) == before


def test_broker_unreachable_exits_69_before_creating_a_job(difflabel, Session, model, folder):
    before = n_jobs(Session)
    url = f"redis://{CLOSED}/0"
    r = difflabel("submit", folder, "--labels", "cat,dog", "--model", model, *FAST, "--no-progress",
                  env={"DIFFLABEL_BROKER_URL": url}, timeout=60)
    assert r.code == EXIT_UNAVAILABLE, r
    one_error_line(r, url)
    assert n_jobs(Session) == before  # refused before a job nobody could run was created

    r = difflabel("worker", env={"DIFFLABEL_BROKER_URL": url}, timeout=90)
    assert r.code == EXIT_UNAVAILABLE, r
    assert url in r.stderr and "Traceback" not in r.stderr, r


@pytest.mark.parametrize("command", [["list"], ["status"], ["db", "upgrade"], ["submit"]])
def test_database_unreachable_exits_69(difflabel, model, folder, command):
    url = f"postgresql://postgres:s3cret@{CLOSED}/difflabel"
    args = [*command, folder, "--labels", "cat,dog", "--model", model, "--no-progress"] \
        if command == ["submit"] else command
    r = difflabel(*args, env={"DIFFLABEL_DATABASE_URL": url}, timeout=60)
    assert r.code == EXIT_UNAVAILABLE, r
    one_error_line(r, CLOSED)
    assert "s3cret" not in r.stderr + r.stdout  # passwords are never printed


def test_s3_endpoint_unreachable_exits_69(difflabel, Session, model):
    before = n_jobs(Session)
    r = difflabel("submit", "s3://bucket/photos/", "--labels", "cat,dog", "--model", model,
                  "--no-progress", env={"DIFFLABEL_S3_ENDPOINT_URL": f"http://{CLOSED}"}, timeout=120)
    assert r.code == EXIT_UNAVAILABLE, r
    one_error_line(r, "bucket")
    assert n_jobs(Session) == before
