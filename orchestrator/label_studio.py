"""A job's answers as Label Studio tasks: the labelling config, one task per labelled item with
the model's answer as a prediction, and image URLs a Label Studio server can show.

A task (Label Studio's JSON import format, imported by a stock server as it is)::

    {"data": {"image": URL, "uri": "s3://bucket/a.png", "difflabel_job": 7, "difflabel_item": 12},
     "predictions": [{"model_version": "demo (rule=ttest, seed=0, ...)", "score": 0.93,
                      "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                  "value": {"choices": ["cat"]}}]}]}

Image URLs (``ImageUrls``):

* a local file becomes ``/data/local-files/?d=PATH``, PATH relative to the server's
  ``LOCAL_FILES_DOCUMENT_ROOT`` (``document_root``, default ``/``). Label Studio serves it when
  started with ``LOCAL_FILES_SERVING_ENABLED=true`` and the project has a local-files storage
  whose path holds the image (``review push`` connects one).
* ``s3://bucket/key`` becomes a presigned GET URL (``s3_urls="presign"``, valid
  ``expires`` seconds, at most 7 days), or stays ``s3://...`` (``"s3"``) for a project with
  Label Studio's own S3 storage connected, which signs such URLs itself.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from sqlalchemy.orm import Session

from orchestrator import jobs, s3
from orchestrator.results import result_pages
from orchestrator.schema import ItemStatus, Job
from worker.errors import UsageError

#: The control and object names of the labelling config difflabel creates.
FROM_NAME, TO_NAME, DATA_KEY = "label", "image", "image"
#: Longest a presigned S3 URL may live (SigV4's limit: 7 days).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
S3_URL_MODES = ("presign", "s3")


def labelling_config(labels: list[str]) -> str:
    """A single-choice image classification config over ``labels`` (XML-escaped)."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (f'<View>\n  <Image name="{TO_NAME}" value="${DATA_KEY}"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def model_version(job: Job) -> str:
    """The model and the scoring settings the job ran with, as one string."""
    params = ", ".join(f"{k}={v}" for k, v in sorted((job.params or {}).items()))
    return f"{job.model} ({params})" if params else job.model


@dataclass(frozen=True)
class Names:
    """Where a project's config puts the answer: the Choices control, its image, the data key."""

    from_name: str = FROM_NAME
    to_name: str = TO_NAME
    data_key: str = DATA_KEY


@dataclass(frozen=True)
class ImageUrls:
    """How item URIs become URLs the server shows (see the module docstring)."""

    document_root: str = "/"
    s3_urls: str = "presign"
    expires: int = MAX_PRESIGN_SECONDS
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if self.s3_urls not in S3_URL_MODES:
            raise UsageError(f"--s3-urls {self.s3_urls!r}: give presign or s3")
        if not 1 <= self.expires <= MAX_PRESIGN_SECONDS:
            raise UsageError(f"--url-expiry {self.expires}: give 1 to {MAX_PRESIGN_SECONDS} seconds (7 days)")

    def url(self, uri: str) -> str:
        if s3.is_s3(uri):
            if self.s3_urls == "s3":
                return uri
            u = s3.parse(uri)
            return s3.client(self.endpoint_url).generate_presigned_url(
                "get_object", Params={"Bucket": u.bucket, "Key": u.key}, ExpiresIn=self.expires)
        return "/data/local-files/?d=" + quote(self.relative(uri), safe="/")

    def relative(self, path: str) -> str:
        """``path`` relative to the document root, as Label Studio's ``?d=`` wants it."""
        root = os.path.abspath(os.path.expanduser(self.document_root))
        full = os.path.abspath(path)
        if os.path.commonpath([root, full]) != root:
            raise UsageError(f"{path} is not under the Label Studio document root {root}: give --document-root "
                             "a folder above it (the server's LOCAL_FILES_DOCUMENT_ROOT)")
        return os.path.relpath(full, root)


def task(row: Any, job_id: int, urls: ImageUrls, version: str, names: Names = Names()) -> dict[str, Any]:
    """One labelled item (a ``result_pages`` row) as a task with the model's answer as a prediction."""
    return {
        "data": {names.data_key: urls.url(row.uri), "uri": row.uri, "difflabel_job": job_id,
                 "difflabel_item": row.id},
        "predictions": [{
            "model_version": version,
            "score": float(row.confidence) if row.confidence is not None else None,
            "result": [{"from_name": names.from_name, "to_name": names.to_name, "type": "choices",
                        "value": {"choices": [row.label]}}],
        }],
    }


def labelled_rows(s: Session, job_id: int) -> Iterator[Any]:
    """The job's finished items (``result_pages`` rows) in id order."""
    for page in result_pages(s, job_id, only_status=ItemStatus.DONE.value):
        yield from page


def export_tasks(s: Session, job_id: int, dest: str, urls: ImageUrls) -> int:
    """Write the job's finished items as a Label Studio import file (a JSON list) to a local
    path or an ``s3://`` key; returns the task count."""
    job = jobs.get_job(s, job_id)
    version = model_version(job)
    buf = io.StringIO()
    buf.write("[\n")
    n = 0
    for row in labelled_rows(s, job_id):
        buf.write((",\n" if n else "") + json.dumps(task(row, job_id, urls, version)))
        n += 1
    buf.write("\n]\n")
    if not n:
        raise UsageError(f"job {job_id} has no finished items yet: wait for it (`difflabel status {job_id}`)")
    if s3.is_s3(dest):
        s3.put_bytes(dest, buf.getvalue().encode(), urls.endpoint_url, "application/json")
    else:
        path = Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(buf.getvalue())
    return n
