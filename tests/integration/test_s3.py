"""A job whose images live in S3 (a moto server), exported back to S3 with object tags."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from itsupport import FAST, LABELS, digit_pngs, items_of, job_of, n_jobs, scores_of

pytestmark = pytest.mark.integration


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(digit_pngs(1)[0]).convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]  # a real JPEG header, then nothing


def test_s3_job_export_and_tags(worker, difflabel, Session, model, s3, token, tmp_path):
    c = s3.client()
    bucket = f"it-{token}"
    c.create_bucket(Bucket=bucket)
    pngs = digit_pngs(3)
    good_keys = ["photos/a.png", "photos/sub/b.png", "photos/ünï cødé 3.png"]
    for key, src in zip(good_keys, pngs):
        c.put_object(Bucket=bucket, Key=key, Body=src.read_bytes())
    c.put_object(Bucket=bucket, Key="photos/empty.png", Body=b"")
    c.put_object(Bucket=bucket, Key="photos/broken.jpg", Body=truncated_jpeg())
    c.put_object(Bucket=bucket, Key="photos/readme.txt", Body=b"not an image")
    c.put_object(Bucket=bucket, Key="elsewhere/c.png", Body=pngs[0].read_bytes())  # outside the prefix

    source = f"s3://{bucket}/photos/"
    r = difflabel("submit", source, "--labels", ",".join(LABELS), "--model", model, *FAST,
                  "--no-progress", "--wait", "--timeout", "120")
    assert r.code == 3, r
    job_id = int(r.last_line)
    worker.alive()

    job = job_of(Session, job_id)
    items = items_of(Session, job_id)
    uri = lambda key: f"s3://{bucket}/{key}"  # noqa: E731
    assert job.status == "partial" and job.source == source
    assert job.n_skipped == 1  # readme.txt
    assert set(items) == {uri(k) for k in good_keys + ["photos/empty.png", "photos/broken.jpg"]}
    for key in good_keys:
        it = items[uri(key)]
        assert it.status == "done", (key, it.error)
        assert it.label in LABELS and it.etag and it.size > 0
        assert it.n_evals == sum(len(e) for _, _, e in scores_of(Session, it.id)) > 0
    empty, broken = items[uri("photos/empty.png")], items[uri("photos/broken.jpg")]
    assert empty.status == broken.status == "failed"
    assert "photos/empty.png" in empty.error and "empty" in empty.error, empty.error
    assert "photos/broken.jpg" in broken.error, broken.error
    assert "\n" not in empty.error + broken.error

    dest = f"s3://{bucket}/out/results.jsonl"
    r = difflabel("export", job_id, "--to", dest, "--tag")
    assert r.code == 0, r
    body = c.get_object(Bucket=bucket, Key="out/results.jsonl")["Body"].read().decode()
    rows = {row["uri"]: row for row in map(json.loads, body.splitlines())}
    assert set(rows) == set(items)
    for u, row in rows.items():
        assert (row["label"], row["status"], row["n_evals"]) == (items[u].label, items[u].status,
                                                                 items[u].n_evals)
    for key in good_keys:
        tags = {t["Key"]: t["Value"] for t in c.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
        assert tags.get("difflabel-label") == items[uri(key)].label, (key, tags)
        assert abs(float(tags["difflabel-confidence"]) - items[uri(key)].confidence) < 1e-3
    for key in ("photos/empty.png", "photos/broken.jpg", "photos/readme.txt", "elsewhere/c.png"):
        assert c.get_object_tagging(Bucket=bucket, Key=key)["TagSet"] == [], key

    local = tmp_path / "results.jsonl"  # a local file: the same rows as the S3 object
    r = difflabel("export", job_id, "--to", str(local))
    assert r.code == 0, r
    assert local.read_text() == body
    r = difflabel("export", job_id, "--to", f"s3://{bucket}/out/")  # no key
    assert r.code == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r
    r = difflabel("export", job_id, "--to", f"s3://no-such-bucket-{token}/results.jsonl")
    assert r.code == 1 and f"no-such-bucket-{token}" in r.stderr and "Traceback" not in r.stderr, r

    r = difflabel("export", job_id, "--to", f"s3://{bucket}/out/results.csv")
    assert r.code == 0, r
    head = c.get_object(Bucket=bucket, Key="out/results.csv")["Body"].read().decode().splitlines()[0]
    assert head.split(",")[:6] == ["uri", "label", "confidence", "margin", "n_evals", "status"]


def test_s3_missing_bucket_and_empty_prefix(difflabel, Session, model, s3, token):
    c = s3.client()
    bucket = f"it-{token}-e"
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="photos/a.png", Body=digit_pngs(1)[0].read_bytes())
    jobs_before = n_jobs(Session)
    common = ["--labels", "cat,dog", "--model", model, "--no-progress"]

    missing = f"no-such-bucket-{token}"
    r = difflabel("submit", f"s3://{missing}/photos/", *common)
    assert r.code in (1, 2), r
    assert r.stderr.startswith("error:") and missing in r.stderr and "Traceback" not in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1, r

    r = difflabel("submit", f"s3://{bucket}/nothing-here/", *common)
    assert r.code == 2, r
    assert r.stderr.startswith("error:") and "no images" in r.stderr and "Traceback" not in r.stderr, r

    r = difflabel("submit", "s3:///photos/", *common)
    assert r.code == 2 and "bucket" in r.stderr and "Traceback" not in r.stderr, r

    assert n_jobs(Session) == jobs_before  # none of these left a job behind


def test_listing_by_folder_equals_plain_listing(s3, token, monkeypatch):
    """The concurrent per-folder listing and its fast page parser return exactly the objects,
    sizes and ETags that botocore's own paged listing does, odd key spellings included."""
    from orchestrator import s3 as s3mod

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    c = s3.client()
    bucket = f"ls-{token}"
    c.create_bucket(Bucket=bucket)
    keys = ["tree/top.png", "tree/a/1.png", "tree/a/2.jpg", "tree/b c/ünï cødé.png", "tree/b c/x+y%20z.png",
            "tree/deep/d1/d2/only.png", "tree/deep/d1/d2/also & more.png", "other/z.png", "root.png"]
    keys += [f"tree/many/{i:04d}.png" for i in range(1203)]  # spans pages of 1,000
    for i, k in enumerate(keys):
        c.put_object(Bucket=bucket, Key=k, Body=b"x" * (i % 7))
    for prefix in ["tree/", "tree", "tree/deep/", "tree/a/", ""]:
        uri = f"s3://{bucket}/{prefix}"
        split = [(o.uri, o.etag, o.size) for o in s3mod.list_objects(uri, s3.endpoint_url)]
        with monkeypatch.context() as m:
            m.setattr(s3mod, "MAX_SPLIT_FOLDERS", -1)  # forces one paged listing of the prefix
            paged = [(o.uri, o.etag, o.size) for o in s3mod.list_objects(uri, s3.endpoint_url)]
        plain = [(f"s3://{bucket}/{o['Key']}", o["ETag"].strip('"'), o["Size"])  # botocore's own parser
                 for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                 for o in page.get("Contents", ())]
        expected = {f"s3://{bucket}/{k}" for k in keys if k.startswith(prefix)}
        assert len(split) == len(set(split)) == len(expected), prefix
        assert {u for u, _, _ in split} == expected, prefix
        assert sorted(split) == plain and paged == plain, prefix
        assert all(e and len(e) == 32 for _, e, _ in split), prefix  # ETags unquoted
