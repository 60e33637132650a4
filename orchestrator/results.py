"""Reading a job's per-item results and writing them as JSON lines or CSV (stdout, a file or S3)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from orchestrator import jobs, s3
from orchestrator.schema import Item, ItemStatus

#: ``label`` is always the model's answer; ``reviewed_label`` a reviewer's (``difflabel review``),
#: and ``decided_by`` says which one stands: ``review`` or ``model`` (none while unfinished).
FIELDS = ["uri", "label", "confidence", "margin", "n_evals", "status", "error", "reviewed_label",
          "reviewed_by", "decided_by"]
#: Items read per query while streaming results.
PAGE = 2_000


def result_pages(s: Session, job_id: int, *, min_confidence: float | None = None,
                 only_status: str | None = None, keep_reviewed: bool = False) -> Iterator[list[Any]]:
    """A job's items in id order, PAGE at a time (constant memory for million-item jobs), as
    plain rows of the result columns: no ORM objects (1,000,000 items: 24.8 s with them).
    ``keep_reviewed``: items a reviewer labelled pass ``min_confidence`` whatever the model's."""
    last = 0
    while True:
        q = select(Item.id, Item.uri, Item.label, Item.confidence, Item.margin, Item.n_evals, Item.status,
                   Item.error, Item.reviewed_label, Item.reviewed_by).where(Item.job_id == job_id, Item.id > last).order_by(Item.id).limit(PAGE)
        if only_status is not None:
            q = q.where(Item.status == only_status)
        if min_confidence is not None:
            q = q.where(or_(Item.confidence >= min_confidence, Item.reviewed_label.is_not(None))
                        if keep_reviewed else Item.confidence >= min_confidence)
        page = s.execute(q).all()
        if not page:
            return
        last = page[-1].id
        yield page


def iter_results(s: Session, job_id: int, *, min_confidence: float | None = None,
                 with_scores: bool = False, only_failed: bool = False) -> Iterator[dict[str, Any]]:
    """Items in id order, as result rows (see ``result_pages``)."""
    labels = jobs.labels_of(s, job_id) if with_scores else []
    for page in result_pages(s, job_id, min_confidence=min_confidence,
                             only_status=ItemStatus.FAILED.value if only_failed else None):
        scores = jobs.item_scores(s, [i.id for i in page]) if with_scores else {}
        for it in page:
            row = {"uri": it.uri, "label": it.label, "confidence": it.confidence, "margin": it.margin,
                   "n_evals": it.n_evals, "status": it.status, "error": it.error,
                   "reviewed_label": it.reviewed_label, "reviewed_by": it.reviewed_by,
                   "decided_by": decided_by(it)}
            if with_scores:
                import numpy as np  # only with --scores: `status` and plain results skip it

                per: dict[int, list[np.ndarray]] = {}
                for _, k, errs in scores.get(it.id, []):
                    per.setdefault(k, []).append(errs)
                # float64 means of the float32 errors, exactly as the classifier reports them
                row["scores"] = {labels[k]: float(np.mean(np.concatenate(v).astype(np.float64)))
                                 for k, v in sorted(per.items())}
                row["counts"] = {labels[k]: int(sum(len(e) for e in v)) for k, v in sorted(per.items())}
            yield row


def decided_by(it: Any) -> str | None:
    """``review`` when a reviewer's label stands, ``model`` for the model's, None while unfinished."""
    if it.reviewed_label is not None:
        return "review"
    return "model" if it.status == ItemStatus.DONE.value else None


def csv_columns(s: Session, job_id: int, with_scores: bool = False) -> list[str]:
    """The CSV header of a job's results: FIELDS, then one ``score:LABEL`` per class in
    class order. Known from the job's labels, so the CSV can stream: the first row may
    have no scores at all (a failed item) or only some (classes never scored)."""
    return FIELDS + ([f"score:{label}" for label in jobs.labels_of(s, job_id)] if with_scores else [])


def write_rows(rows: Iterator[dict[str, Any]], fmt: str, out: IO[str],
               columns: list[str] | None = None) -> int:
    """Write ``rows`` as jsonl, json or csv; returns the row count.

    For csv, ``columns`` (see ``csv_columns``) is the header and rows stream through.
    Without it every row is read first to find all the score columns (memory grows with
    the job): a header taken from the first row alone would drop every score column when
    that item has none."""
    n = 0
    if fmt in ("jsonl", "json"):
        if fmt == "json":
            out.write("[\n")
        for r in rows:
            if fmt == "json" and n:
                out.write(",\n")
            out.write(json.dumps(r))
            if fmt == "jsonl":
                out.write("\n")
            n += 1
        if fmt == "json":
            out.write("\n]\n")
        return n
    flat_rows: Iterable[dict[str, Any]] = map(_flat, rows)
    if columns is None:
        flat_rows = list(flat_rows)
        columns = FIELDS + _merge_orders([k for k in r if k not in FIELDS] for r in flat_rows)
    # Missing scores (pruned before scoring, failed items) are written as empty cells.
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", restval="")
    writer.writeheader()
    for flat in flat_rows:
        writer.writerow(flat)
        n += 1
    return n


def _flat(r: dict[str, Any]) -> dict[str, Any]:
    flat = {k: r.get(k) for k in FIELDS}
    for k, v in (r.get("scores") or {}).items():
        flat[f"score:{k}"] = v
    return flat


def _merge_orders(orders: Iterable[list[str]]) -> list[str]:
    """One list holding every key of ``orders``, each of which is in class order (a row's
    scores are): a new key goes just before the next key of its own row already placed,
    else at the end, so class order is kept as far as the rows show it."""
    merged: list[str] = []
    placed: set[str] = set()  # a set: most rows hold only keys already placed
    for keys in orders:
        for i, k in enumerate(keys):
            if k in placed:
                continue
            later = next((x for x in keys[i + 1:] if x in placed), None)
            merged.insert(merged.index(later) if later is not None else len(merged), k)
            placed.add(k)
    return merged


def export_rows(s: Session, job_id: int, dest: str, fmt: str | None, with_scores: bool, tag_objects: bool,
                endpoint_url: str | None) -> tuple[int, int]:
    """Write results to ``dest`` (s3://... or a local file); optionally tag labelled S3 objects.
    Returns (rows, tagged)."""
    fmt = fmt or ("csv" if os.path.splitext(dest)[1].lower() == ".csv" else "jsonl")
    buf = io.StringIO()
    n = write_rows(iter_results(s, job_id, with_scores=with_scores), fmt, buf,
                   columns=csv_columns(s, job_id, with_scores))
    if s3.is_s3(dest):
        s3.parse(dest)
        s3.put_bytes(dest, buf.getvalue().encode(), endpoint_url,
                     "text/csv" if fmt == "csv" else "application/x-ndjson")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with open(dest, "w", newline="") as fh:
            fh.write(buf.getvalue())
    return n, tag_labelled(s, job_id, endpoint_url) if tag_objects else 0


def tag_labelled(s: Session, job_id: int, endpoint_url: str | None) -> int:
    """Tag each labelled S3 object with its label and confidence; returns how many."""
    tagged = 0
    for r in iter_results(s, job_id):
        if r["status"] == ItemStatus.DONE.value and s3.is_s3(r["uri"]):
            s3.tag(r["uri"], {"difflabel-label": r["label"],
                              "difflabel-confidence": f"{r['confidence']:.4f}"}, endpoint_url)
            tagged += 1
    return tagged
