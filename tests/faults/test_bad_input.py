"""Bad input through the real system: each case is labelled, refused with a one-line error
that names the fix, or recorded as that item's failure; never a traceback or a stuck job.
Also: credentials never reach logs, command output or the database."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from harness import LABELS, PrivateRedis, check, report

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = ["--min-scores", "4", "--max-scores", "8", "--samples-per-round", "2"]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with almost no pixel data behind it."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def variants(scan: Path) -> dict[str, bytes]:
    """key -> bytes: odd-but-valid images (labelled) and broken ones (failed with a reason)."""
    rgb = Image.open(scan).convert("RGB").resize((32, 32))
    wide = Image.fromarray(__import__("numpy").asarray(rgb.convert("L"), dtype="uint16") * 257)
    jpeg = encoded(rgb, "JPEG", quality=90)
    return {
        "ok/plain.png": encoded(rgb, "PNG"),
        "ok/ünï cødé key with spaces.png": encoded(rgb, "PNG"),
        "ok/cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "ok/sixteen-bit.png": encoded(wide, "PNG"),
        "ok/palette.png": encoded(rgb.convert("P"), "PNG"),
        "ok/alpha.png": encoded(rgb.convert("RGBA"), "PNG"),
        "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad/text-named.png": b"these are words, not pixels\n" * 10,
        "bad/zero-bytes.png": b"",
        "bad/huge-20000x20000.png": png_claiming(20_000, 20_000),
        "skip/readme.txt": b"not an image by name: skipped and counted",
    }


def one_line_error(r, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and all(w in err for w in words), err


def test_bad_input_through_the_system(cluster, images, timer, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="odd")
    s3.create_bucket(Bucket="empty")
    cases = variants(sorted(images.iterdir())[0])
    for key, data in cases.items():
        s3.put_object(Bucket="odd", Key=f"in/{key}", Body=data)
    cluster.start_worker()

    job = cluster.submit("s3://odd/in/")
    st = cluster.wait(job)
    row = check(cluster.db_url, job, None)
    report({"scenario": "bad images in the source (S3)", "faults": "4 broken, 6 odd, 1 non-image", **row,
            "seconds": round(timer(), 1)})
    assert st["status"] == "partial" and st["skipped_objects"] == 1, st
    assert row["lost"] == row["duplicated"] == row["skipped_rounds"] == 0, row
    out = cluster.cli("results", str(job), "-o", "jsonl")
    res = {r["uri"].split("/in/", 1)[1]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(res) == {k for k in cases if not k.startswith("skip/")}
    for key, r in res.items():
        if key.startswith("ok/"):
            assert r["status"] == "done" and r["label"] in LABELS, (key, r)
        else:
            assert r["status"] == "failed" and r["error"] and "\n" not in r["error"], (key, r)
    assert "too large" in res["bad/huge-20000x20000.png"]["error"]
    assert "DIFFLABEL_MAX_IMAGE_PIXELS" in res["bad/huge-20000x20000.png"]["error"]

    # Label sets: odd ones are labelled, impossible ones refused before any job exists.
    odd = ['a "quoted" cat', "dog {not a placeholder}", "it's a bird"]
    job2 = cluster.submit("s3://odd/in/ok/", labels=odd)
    st2 = cluster.wait(job2)
    assert st2["status"] == "done", st2
    assert {json.loads(x)["label"] for x in cluster.cli("results", str(job2), "-o", "jsonl").stdout.splitlines()} <= set(odd)
    # 1,000 labels the tiny model's 12-word tokenizer tells apart (three known words each): labels
    # it reads as the same tokens are refused, since such classes could never be told apart.
    import itertools

    words = "a photo of the cat dog bird fish car digit zero one".split()
    many = tmp_path / "1000-labels.txt"
    many.write_text("\n".join(" ".join(w) for w in itertools.islice(itertools.product(words, repeat=3), 1000)))
    r = cluster.cli("submit", "s3://odd/in/ok/plain.png", "--labels-file", many, "--model", cluster.model, *FAST,
                    "--template", "{}", "--no-progress", "--wait", "--timeout", "240")
    assert r.returncode == 0, r.stderr
    st3 = cluster.status(int(r.stdout.strip().splitlines()[-1]))
    assert st3["status"] == "done" and st3["classes"] == 1000, st3
    report({"scenario": "1,000 labels; labels with quotes and braces", "faults": "-", "job_status": "done",
            "items": st2["items"] + st3["items"], "lost": 0, "duplicated": 0, "wrong": 0, "failed": 0,
            "seconds": round(timer(), 1)})

    n_jobs = len(json.loads(cluster.cli("list", "-o", "json").stdout))
    submit = ["submit", "s3://odd/in/ok/", "--model", cluster.model, "--no-progress"]
    one_line_error(cluster.cli(*submit, "--labels", ""), 2, "at least two labels")
    one_line_error(cluster.cli(*submit, "--labels", "cat"), 2, "only one label")
    one_line_error(cluster.cli(*submit, "--labels", "cat,dog,cat"), 2, "duplicate label 'cat'")
    one_line_error(cluster.cli(*submit, "--labels", "cat,dog", "--template", "a photo"), 2, "{}")
    one_line_error(cluster.cli(*submit, "--labels", "cat,dog", "--template", "{} and {}"), 2, "{}")
    one_line_error(cluster.cli(*submit, "--labels", "cat,dog", "--template", "x" * 5000 + "{}"), 2, "limit")
    one_line_error(cluster.cli(*submit, "--labels", "zebra,okapi"), 2, "'zebra' and 'okapi'", "same tokens")
    one_line_error(cluster.cli("submit", "s3://empty/nothing/", "--labels", "cat,dog", "--model", cluster.model),
                   2, "no images found", "s3://empty/nothing/")
    one_line_error(cluster.cli("submit", "s3://no-such-bucket-here/x/", "--labels", "cat,dog", "--model",
                               cluster.model), 1, "no-such-bucket-here")
    assert len(json.loads(cluster.cli("list", "-o", "json").stdout)) == n_jobs  # refused: no job left behind
    report({"scenario": "refused input (0/1/duplicate labels, bad templates, labels the tokenizer cannot tell "
                        "apart, empty prefix, missing bucket)",
            "faults": "9 refusals", "job_status": "-", "items": 0, "lost": 0, "duplicated": 0, "wrong": 0,
            "failed": 0, "seconds": round(timer(), 1)})


def test_credentials_never_logged_or_stored(private_postgres, s3_endpoint, model, images, tmp_path, timer):
    """A broker password and an AWS secret key stay out of logs, output and the database."""
    from harness import Cluster

    secret_key, redis_password = "SeCrEtKeY-4b1d9e0f7a", "RedisPa55-77c3e2"
    redis = PrivateRedis(password=redis_password)
    redis.start()
    c = Cluster(redis, private_postgres, s3_endpoint, model, tmp_path,
                extra_env={"AWS_SECRET_ACCESS_KEY": secret_key})
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key=secret_key)
        s3.create_bucket(Bucket="creds")
        for p in sorted(images.iterdir())[:4]:
            s3.put_object(Bucket="creds", Key=f"in/{p.name}", Body=p.read_bytes())
        c.start_worker()
        job = c.submit("s3://creds/in/")
        c.wait(job)
        outputs = [c.cli(*a) for a in (["status", str(job)], ["status", str(job), "-o", "json"], ["list"],
                                       ["results", str(job), "-o", "csv"])]
        bad = c.cli("submit", "s3://creds/in/", "--labels", "cat,dog", "--model", model,
                    env={"DIFFLABEL_BROKER_URL": f"redis://:{redis_password}@127.0.0.1:1/0"})
        assert bad.returncode == 69 and ":***@" in bad.stderr, bad.stderr  # the URL is named, redacted
        texts = [w.text() for w in c.workers] + [o.stdout + o.stderr for o in [*outputs, bad]]
        import psycopg

        with psycopg.connect(c.db_url) as conn:
            for table in ("jobs", "job_classes", "items"):
                texts += [json.dumps(r, default=str) for r in conn.execute(f"select * from {table}").fetchall()]
        leaks = [t for t in texts if secret_key in t or redis_password in t]
        assert not leaks, leaks[0][:500]
        report({"scenario": "credentials in the environment", "faults": "-", "job_status": "done",
                "items": 4, "lost": 0, "duplicated": 0, "wrong": 0, "failed": 0,
                "seconds": round(timer(), 1), "note": f"{len(texts)} logs/outputs/rows searched, 0 leaks"})
    finally:
        c.close()
        redis.stop()


def test_no_permission_on_the_bucket(cluster, tmp_path, timer):
    """moto enforcing IAM: a user allowed only s3:GetObject cannot list the bucket."""
    import os
    import subprocess

    import boto3

    from harness import BIN, free_port, wait_port

    port = free_port()
    # The first 4 requests (the setup below) run unauthenticated; every later one is checked.
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 30, proc)
        endpoint = f"http://127.0.0.1:{port}"
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
              "aws_secret_access_key": "admin"}
        boto3.client("s3", **kw).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="get-only", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}))
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "DIFFLABEL_S3_ENDPOINT_URL": endpoint}
        r = cluster.cli("submit", "s3://locked/photos/", "--labels", "cat,dog", "--model", cluster.model, env=env)
        one_line_error(r, 1, "access denied to bucket 'locked'", "s3:ListBucket")
        assert key["SecretAccessKey"] not in r.stdout + r.stderr
        report({"scenario": "user without s3:ListBucket on the bucket", "faults": "-", "job_status": "-",
                "items": 0, "lost": 0, "duplicated": 0, "wrong": 0, "failed": 0, "seconds": round(timer(), 1),
                "note": "exit 1, names the bucket and the permission"})
    finally:
        proc.kill()
        proc.wait(10)
