"""A finished job as a training set: an image-folder tree or a Parquet file.

* ``imagefolder``: ``DEST/<label>/<file name>``, one folder per label (the reviewed label when a
  reviewer gave one, ``difflabel review``, else the model's), the layout that
  torchvision's ``ImageFolder`` and Hugging Face's ``imagefolder`` loader read. Locally the
  files are symbolic links to the originals (``copy=True``: copies; S3 images are
  downloaded); in S3 (``DEST`` = ``s3://bucket/prefix``) they are server-side copies of S3
  images, uploads of local ones.
* ``parquet``: one row per labelled item (uri, label, confidence, margin, n_evals, and
  reviewed_label: a reviewer's label or null; ``label`` stays the model's), and the
  image bytes with ``images=True``; a local path or an ``s3://`` key. pandas and Hugging
  Face ``datasets`` read it as it is.

Only items that finished with a label are exported, and with ``min_confidence`` only those
at least that confident, or reviewed (a reviewer's label is kept whatever the model's confidence). Labels become folder names with ``/`` and other characters a file
system refuses replaced by ``_``; two images with the same file name under one label keep
both, the later one with a short hash of its URI in its name.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from orchestrator import s3
from orchestrator.results import PAGE, result_pages
from orchestrator.schema import ItemStatus
from worker.errors import UsageError

FORMATS = ("imagefolder", "parquet")
_UNSAFE = re.compile(r'[/\\\x00-\x1f<>:"|?*]')


def labelled(s: Session, job_id: int, min_confidence: float | None) -> Iterator[Any]:
    """Finished items in id order (rows with uri, label, confidence, margin, n_evals, reviewed_label)."""
    for page in result_pages(s, job_id, min_confidence=min_confidence, only_status=ItemStatus.DONE.value,
                             keep_reviewed=True):
        yield from page


def folder_name(label: str) -> str:
    """A label as one path component: never empty, never '.' or '..', no separators."""
    name = _UNSAFE.sub("_", label).strip()
    return "_" if name in ("", ".", "..") else name


def _file_name(uri: str, taken: set[str]) -> str:
    name = PurePosixPath(uri).name or "image"
    if name in taken:
        stem, ext = os.path.splitext(name)
        name = f"{stem}-{hashlib.blake2b(uri.encode(), digest_size=4).hexdigest()}{ext}"
    taken.add(name)
    return name


def export_imagefolder(s: Session, job_id: int, dest: str, *, min_confidence: float | None = None,
                       copy: bool = False, endpoint_url: str | None = None,
                       missing: list[str] | None = None) -> dict[str, int]:
    """Write the tree; returns images per label folder. Local images that no longer exist
    are left out and their paths appended to ``missing``."""
    to_s3 = s3.is_s3(dest)
    if to_s3:
        base = s3.parse(dest)
        prefix = base.key.rstrip("/") + "/" if base.key else ""
    else:
        root = Path(dest)
        if root.exists() and any(root.iterdir()):
            raise UsageError(f"{dest} exists and is not empty: give a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    names: dict[str, set[str]] = {}
    for it in labelled(s, job_id, min_confidence):
        if not s3.is_s3(it.uri) and not Path(it.uri).is_file():
            if missing is not None:
                missing.append(it.uri)
            continue
        folder = folder_name(it.reviewed_label if it.reviewed_label is not None else it.label)
        name = _file_name(it.uri, names.setdefault(folder, set()))
        if to_s3:
            target = f"s3://{base.bucket}/{prefix}{folder}/{name}"
            if s3.is_s3(it.uri):
                s3.copy(it.uri, target, endpoint_url)
            else:
                s3.put_bytes(target, Path(it.uri).read_bytes(), endpoint_url)
        else:
            path = root / folder / name
            path.parent.mkdir(exist_ok=True)
            if s3.is_s3(it.uri):
                path.write_bytes(s3.get_bytes(it.uri, endpoint_url))
            elif copy:
                shutil.copyfile(it.uri, path)
            else:
                path.symlink_to(Path(it.uri).resolve())
        counts[folder] = counts.get(folder, 0) + 1
    return counts


def export_parquet(s: Session, job_id: int, dest: str, *, min_confidence: float | None = None,
                   images: bool = False, endpoint_url: str | None = None) -> int:
    """Write the Parquet file; returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("uri", pa.string()), ("label", pa.string()), ("confidence", pa.float64()),
              ("margin", pa.float64()), ("n_evals", pa.int64()), ("reviewed_label", pa.string())]
    if images:
        fields.append(("image", pa.binary()))
    schema = pa.schema(fields)
    out = io.BytesIO() if s3.is_s3(dest) else None
    if out is None:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out if out is not None else dest, schema)
    n = 0
    try:
        batch: list[Any] = []
        for it in labelled(s, job_id, min_confidence):
            batch.append(it)
            if len(batch) == PAGE:
                n += _write(writer, schema, batch, images, endpoint_url)
                batch = []
        n += _write(writer, schema, batch, images, endpoint_url)
    finally:
        writer.close()
    if out is not None:
        s3.put_bytes(dest, out.getvalue(), endpoint_url, "application/vnd.apache.parquet")
    return n


def _write(writer, schema, batch, images: bool, endpoint_url: str | None) -> int:
    import pyarrow as pa

    if not batch:
        return 0
    cols: dict[str, list] = {
        "uri": [r.uri for r in batch], "label": [r.label for r in batch],
        "confidence": [r.confidence for r in batch], "margin": [r.margin for r in batch],
        "n_evals": [r.n_evals for r in batch], "reviewed_label": [r.reviewed_label for r in batch],
    }
    if images:
        cols["image"] = [s3.get_bytes(r.uri, endpoint_url) if s3.is_s3(r.uri) else Path(r.uri).read_bytes()
                         for r in batch]
    writer.write_table(pa.table(cols, schema=schema))
    return len(batch)
