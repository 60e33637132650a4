"""Small fixes, each against the real component: S3 tags merged into an object's own tags
(a moto server), CSV headers holding every score column, labels files with a byte-order
mark, and labels whose prompts the tokenizer truncates to the same tokens."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


# --------------------------------------------------------------------------- moto S3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    exe = BIN / "moto_server"
    if not exe.exists():
        exe = shutil.which("moto_server")
        if not exe:
            if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
                pytest.fail("moto_server is not installed (pip install 'moto[server]')", pytrace=False)
            pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **AWS_ENV, **(extra_env or {})})
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto_server not listening after 30 s", pytrace=False)
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """A moto S3 server on a free port (no IAM checks); its endpoint URL."""
    proc, url = _start_moto()
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def aws_env(monkeypatch) -> Iterator[None]:
    """Fake credentials in the environment, and no boto3 client cached from another test."""
    from orchestrator import s3

    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    # boto3's default session keeps the credentials it first read: start a new one.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    s3.client.cache_clear()
    yield
    s3.client.cache_clear()


def _boto(endpoint: str, key: str = "testing", secret: str = "testing", service: str = "s3"):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


def _tags(c, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in c.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


# --------------------------------------------------------------------------- 1. S3 tags


def test_tag_keeps_the_objects_own_tags(moto, aws_env):
    from orchestrator import s3

    c = _boto(moto)
    c.create_bucket(Bucket="tags")
    c.put_object(Bucket="tags", Key="a.png", Body=b"x", Tagging="owner=alice&difflabel-label=old")
    s3.tag("s3://tags/a.png", {"difflabel-label": "seven", "difflabel-confidence": "0.9000"}, moto)
    assert _tags(c, "tags", "a.png") == {"owner": "alice", "difflabel-label": "seven",
                                         "difflabel-confidence": "0.9000"}


def test_tag_refuses_to_go_past_s3s_ten_tags(moto, aws_env):
    from orchestrator import s3
    from worker.errors import PermanentError

    c = _boto(moto)
    c.create_bucket(Bucket="full")
    nine = {f"user{i}": str(i) for i in range(9)}
    c.put_object(Bucket="full", Key="nine.png", Body=b"x", Tagging="&".join(f"{k}={v}" for k, v in nine.items()))
    with pytest.raises(PermanentError) as e:
        s3.tag("s3://full/nine.png", {"difflabel-label": "one", "difflabel-confidence": "0.5000"}, moto)
    msg = str(e.value)
    assert "\n" not in msg and "s3://full/nine.png" in msg and "10 tags" in msg, msg
    assert _tags(c, "full", "nine.png") == nine  # the owner's tags are untouched

    eight = dict(list(nine.items())[:8])  # 8 + 2 = exactly the limit: allowed
    c.put_object(Bucket="full", Key="eight.png", Body=b"x", Tagging="&".join(f"{k}={v}" for k, v in eight.items()))
    s3.tag("s3://full/eight.png", {"difflabel-label": "one", "difflabel-confidence": "0.5000"}, moto)
    assert _tags(c, "full", "eight.png") == {**eight, "difflabel-label": "one", "difflabel-confidence": "0.5000"}


def test_tag_names_the_get_tagging_permission(monkeypatch):
    """moto enforcing IAM: a user who may put tags but not read them gets a one-line error
    naming s3:GetObjectTagging (a merge must read the current tags first); a user who may
    do both gets the merge."""
    import boto3

    from orchestrator import s3
    from worker.errors import PermanentError

    def user(name: str, actions: list[str]) -> dict[str, str]:
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        iam.put_user_policy(UserName=name, PolicyName="tags", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        return key

    def use(key: dict[str, str]) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        # boto3's default session keeps the credentials it first read: start a new one.
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        s3.client.cache_clear()

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # The first 8 requests (the setup below) run unauthenticated; every later one is checked.
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "8"})
    try:
        admin = _boto(url, "admin", "admin")
        admin.create_bucket(Bucket="locked")
        admin.put_object(Bucket="locked", Key="a.png", Body=b"x", Tagging="owner=alice")
        iam = _boto(url, "admin", "admin", service="iam")
        put_only = user("put-only", ["s3:PutObjectTagging"])
        both = user("both", ["s3:PutObjectTagging", "s3:GetObjectTagging"])

        use(put_only)
        with pytest.raises(PermanentError) as e:
            s3.tag("s3://locked/a.png", {"difflabel-label": "one"}, url)
        msg = str(e.value)
        assert "\n" not in msg and "'locked'" in msg and "s3:GetObjectTagging" in msg, msg

        use(both)
        s3.tag("s3://locked/a.png", {"difflabel-label": "one"}, url)
        reader = _boto(url, both["AccessKeyId"], both["SecretAccessKey"])
        assert _tags(reader, "locked", "a.png") == {"owner": "alice", "difflabel-label": "one"}
    finally:
        s3.client.cache_clear()
        _stop(proc)


# --------------------------------------------------------------------------- 2. CSV header


def _row(uri: str, status: str = "done", scores: dict[str, float] | None = None) -> dict:
    row = {"uri": uri, "label": None, "confidence": None, "margin": None, "n_evals": 0, "status": status,
           "error": "bad image" if status == "failed" else None}
    if scores is not None:
        row["scores"] = scores
    return row


def test_csv_header_is_every_column_when_the_first_row_has_no_scores():
    from orchestrator.results import FIELDS, write_rows

    rows = [_row("a", "failed", {}), _row("b", scores={"zero": 0.1, "one": 0.2}),
            _row("c", scores={"one": 0.3, "two": 0.4})]
    out = io.StringIO()
    assert write_rows(iter(rows), "csv", out) == 3
    got = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(got[0]) == FIELDS + ["score:zero", "score:one", "score:two"]
    assert got[0]["score:zero"] == "" and got[0]["error"] == "bad image"
    assert (got[1]["score:zero"], got[1]["score:one"], got[1]["score:two"]) == ("0.1", "0.2", "")
    assert got[2]["score:two"] == "0.4"


def test_csv_with_columns_streams_and_uses_them():
    from orchestrator.results import FIELDS, write_rows

    columns = FIELDS + ["score:zero", "score:one", "score:two"]
    out = io.StringIO()

    def rows():
        yield _row("a", "failed", {})
        # The header and the first row are written before the second row is asked for.
        assert out.getvalue().splitlines()[0].split(",") == columns
        yield _row("b", scores={"two": 0.5})

    assert write_rows(rows(), "csv", out, columns=columns) == 2
    got = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["score:two"] for r in got] == ["", "0.5"]


def test_export_csv_scores_header_from_the_jobs_labels(moto, aws_env, tmp_path):
    """A real job store (SQLite) and S3: the first item failed, yet the exported CSV has a
    score column for every class, in class order."""
    import numpy as np

    from orchestrator import db, jobs
    from orchestrator.results import FIELDS, csv_columns, export_rows
    from orchestrator.schema import Item, ItemStatus, RoundScores
    from worker.config import ScoringConfig

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    db.ensure_schema(url)
    labels = ["zero", "one", "two"]
    with db.sessions(url).begin() as s:
        job = jobs.create_job(s, source="/imgs", model="demo", template="a {}", labels=labels,
                              prompts=[f"a {x}" for x in labels], config=ScoringConfig())
        jobs.add_items(s, job, [("/imgs/bad.png", None, 1), ("/imgs/good.png", None, 1)])
        job_id = job.id
    with db.sessions(url).begin() as s:
        bad, good = s.query(Item).filter(Item.job_id == job_id).order_by(Item.id).all()
        bad.status, bad.error = ItemStatus.FAILED.value, "bad.png: not an image"
        good.status, good.label, good.confidence, good.margin, good.n_evals = \
            ItemStatus.DONE.value, "one", 0.9, 0.2, 4
        # class 0 pruned before it was ever scored: round 0 holds classes 1 and 2
        s.add(RoundScores(**jobs.pack_round(good.id, 0, [1, 2], np.array([[0.5, 0.25]] * 2, dtype="<f4"))))
    _boto(moto).create_bucket(Bucket="out")
    with db.sessions(url)() as s:
        assert csv_columns(s, job_id, True) == FIELDS + ["score:zero", "score:one", "score:two"]
        n, tagged = export_rows(s, job_id, "s3://out/r.csv", None, True, False, moto)
    assert (n, tagged) == (2, 0)
    body = _boto(moto).get_object(Bucket="out", Key="r.csv")["Body"].read().decode()
    got = list(csv.DictReader(io.StringIO(body)))
    assert list(got[0]) == FIELDS + ["score:zero", "score:one", "score:two"]
    assert got[0]["status"] == "failed" and got[0]["score:one"] == ""
    assert (got[1]["score:zero"], float(got[1]["score:one"]), float(got[1]["score:two"])) == ("", 0.375, 0.375)


# --------------------------------------------------------------------------- 3. byte-order mark


def test_labels_file_with_a_byte_order_mark(tmp_path):
    from worker.labels import parse_labels

    f = tmp_path / "labels.txt"
    f.write_bytes(b"\xef\xbb\xbfcat\ndog\n")
    assert parse_labels(file=f) == ["cat", "dog"]
    f.write_bytes(b"\xef\xbb\xbf# my labels\ncat\ndog\n")  # a comment first: still a comment
    assert parse_labels(file=f) == ["cat", "dog"]
    assert parse_labels("\ufeffcat,dog") == ["cat", "dog"]


# --------------------------------------------------------------------------- 4. truncation


#: Eight digit words: with the demo template (5 tokens) the 12-token limit cuts off the last word.
LONG = "one two three four five six seven"


def test_demo_tokenizer_loads_without_torch():
    code = ("import sys; from worker.model_files import load_tokenizer; t = load_tokenizer('demo'); "
            "print(t.model_max_length, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["12", "False"]


def test_missing_or_uncached_models_have_no_tokenizer(tmp_path):
    from worker.model_files import load_tokenizer

    assert load_tokenizer(str(tmp_path / "no-such-model")) is None
    assert load_tokenizer("difflabel-tests/not-cached-here") is None  # the cache only: no download
    (tmp_path / "empty").mkdir()
    assert load_tokenizer(str(tmp_path / "empty")) is None  # a directory with no tokenizer/


def test_labels_equal_after_truncation_are_refused_with_the_demo_tokenizer():
    from worker.errors import UsageError
    from worker.labels import check_distinct_prompts, prompts, refuse_truncated_duplicates
    from worker.model_files import load_tokenizer

    tok = load_tokenizer("demo")
    assert tok.model_max_length == 12
    template = "a photo of the digit {}"
    labels = [f"{LONG} eight", f"{LONG} nine", "zero"]
    with pytest.raises(UsageError) as e:
        check_distinct_prompts(prompts(template, labels), labels, tok)
    assert str(e.value) == (f"labels '{LONG} eight' and '{LONG} nine' give the same prompt after the "
                            "tokenizer's 12-token truncation: shorten the template or the labels")
    with pytest.raises(UsageError, match="12-token truncation"):
        refuse_truncated_duplicates("demo", labels, prompts(template, labels))
    short = [f"{LONG} eight", "zero", "one"]  # distinct within the limit: accepted
    check_distinct_prompts(prompts(template, short), short, tok)
    refuse_truncated_duplicates("demo", short, prompts(template, short))


def test_labels_equal_after_truncation_are_refused_with_a_clip_tokenizer(tiny_sd_model):
    """The tiny SD model's real CLIPTokenizer (byte-level BPE, 8 tokens with BOS and EOS)."""
    from worker.errors import UsageError
    from worker.labels import prompts, refuse_truncated_duplicates
    from worker.model_files import load_tokenizer

    assert load_tokenizer(str(tiny_sd_model)).model_max_length == 8
    labels = ["cat", "cat cat cat cat", "cat cat cat dog"]  # BOS + 6 tokens + EOS: the 4th word is cut
    with pytest.raises(UsageError, match="labels 'cat cat cat cat' and 'cat cat cat dog' give the same "
                                         "prompt after the tokenizer's 8-token truncation"):
        refuse_truncated_duplicates(str(tiny_sd_model), labels, prompts("a photo of {}", labels))
    refuse_truncated_duplicates(str(tiny_sd_model), ["cat", "dog"], prompts("a photo of a {}", ["cat", "dog"]))


def test_classify_refuses_labels_equal_after_truncation(tmp_path):
    from orchestrator import job_commands, local_commands  # noqa: F401 - registers commands
    from orchestrator.cli import cli

    seven = sorted((ROOT / "examples" / "digits" / "seven").glob("*.png"))[0]
    args = ["classify", str(seven), "--labels", f"{LONG} eight,{LONG} nine", "--min-scores", "2",
            "--max-scores", "2", "--no-progress", "-o", "jsonl"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "12-token truncation" in err[0] and f"'{LONG} nine'" in err[0], r.stderr
    assert "Traceback" not in r.output
