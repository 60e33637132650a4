"""`difflabel dataset`: a finished job as an image-folder tree or a Parquet file, read back the
way their users read them (Hugging Face `datasets`, pandas), locally and in S3 (moto)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from itsupport import FAST, LABELS, digit_pngs, items_of

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_local_job(difflabel, model, source) -> int:
    r = difflabel("submit", str(source), "--labels", ",".join(LABELS), "--model", model, *FAST,
                  "--no-progress", "--local")
    assert r.code in (0, 3), r
    return int(r.last_line)


def test_imagefolder_and_parquet_of_a_local_job(difflabel, Session, model, make_images, tmp_path):
    import datasets
    import pandas as pd

    folder = tmp_path / "photos"
    make_images(folder / "a", 5)
    make_images(folder / "b", 3, start=5)
    # the same file name in two folders: both are kept
    (folder / "b" / "img00.png").write_bytes((folder / "a" / "img01.png").read_bytes())
    job_id = run_local_job(difflabel, model, folder)
    done = {u: it for u, it in items_of(Session, job_id).items() if it.status == "done"}
    assert len(done) == 9
    cut = sorted(it.confidence for it in done.values())[3]  # keeps 6 of 9 (distinct values)
    keep = {u: it for u, it in done.items() if it.confidence >= cut}

    tree = tmp_path / "train"
    r = difflabel("dataset", str(job_id), "-f", "imagefolder", "--to", str(tree), "--min-confidence", str(cut))
    assert r.code == 0, r
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    assert len(files) == len(keep)
    for p in files:
        target = Path(os.readlink(p))
        assert p.is_symlink() and str(target) in keep
        assert keep[str(target)].label == p.parent.name
    ds = datasets.load_dataset("imagefolder", data_dir=str(tree), split="train")
    names = ds.features["label"].names
    assert len(ds) == len(keep) and set(names) == {it.label for it in keep.values()}
    assert sorted(names[x] for x in ds["label"]) == sorted(it.label for it in keep.values())
    assert all(isinstance(im, Image.Image) for im in ds["image"])

    again = difflabel("dataset", str(job_id), "-f", "imagefolder", "--to", str(tree))
    assert again.code == 2 and "not empty" in again.stderr

    copies = tmp_path / "copies"
    r = difflabel("dataset", str(job_id), "-f", "imagefolder", "--to", str(copies), "--copy")
    assert r.code == 0, r
    copied = [p for p in copies.rglob("*") if p.is_file()]
    assert len(copied) == 9 and not any(p.is_symlink() for p in copied)

    gone = sorted(done)[0]
    os.rename(gone, gone + ".moved")  # an image deleted after labelling: left out, named
    r = difflabel("dataset", str(job_id), "-f", "imagefolder", "--to", str(tmp_path / "later"), "--copy")
    os.rename(gone + ".moved", gone)
    assert r.code == 0 and f"left out 1 image that no longer exists, e.g. {gone}" in r.stderr, r
    assert len([p for p in (tmp_path / "later").rglob("*") if p.is_file()]) == 8

    pq = tmp_path / "out" / "labels.parquet"
    r = difflabel("dataset", str(job_id), "-f", "parquet", "--to", str(pq), "--images")
    assert r.code == 0, r
    df = pd.read_parquet(pq)
    assert list(df.columns) == ["uri", "label", "confidence", "margin", "n_evals", "reviewed_label", "image"]
    assert len(df) == 9 and set(df.uri) == set(done)
    for row in df.itertuples():
        it = done[row.uri]
        assert (row.label, row.confidence, row.n_evals) == (it.label, it.confidence, it.n_evals)
        assert row.image == Path(row.uri).read_bytes()
    hf = datasets.Dataset.from_parquet(str(pq))
    assert hf.num_rows == 9 and hf[0]["label"] in LABELS


def test_imagefolder_and_parquet_in_s3(difflabel, Session, model, s3, token):
    import pandas as pd

    c = s3.client()
    bucket = f"ds-{token}"
    c.create_bucket(Bucket=bucket)
    pngs = digit_pngs(4)
    for i, src in enumerate(pngs):
        c.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=src.read_bytes())
    job_id = run_local_job(difflabel, model, f"s3://{bucket}/in/")
    done = {u: it for u, it in items_of(Session, job_id).items() if it.status == "done"}
    assert len(done) == 4

    r = difflabel("dataset", str(job_id), "-f", "imagefolder", "--to", f"s3://{bucket}/train/")
    assert r.code == 0, r
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="train/")["Contents"]]
    assert len(keys) == 4
    for key in keys:
        _, label, name = key.split("/")
        src = f"s3://{bucket}/in/{name}"
        assert done[src].label == label
        body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == pngs[int(name.split(".")[0])].read_bytes()

    r = difflabel("dataset", str(job_id), "-f", "parquet", "--to", f"s3://{bucket}/labels.parquet")
    assert r.code == 0, r
    df = pd.read_parquet(io.BytesIO(c.get_object(Bucket=bucket, Key="labels.parquet")["Body"].read()))
    assert set(df.uri) == set(done) and "image" not in df.columns
