"""Where images come from: local files and folders (S3 prefixes are listed in ``s3``)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from worker.errors import UsageError
from worker.images import is_image_name

T = TypeVar("T")


@dataclass
class Listing:
    """Image paths found, plus what was skipped (not an image by name)."""

    items: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def list_local(paths: Iterable[str]) -> Listing:
    """Expand files and folders (recursively, sorted). A file named explicitly is always kept,
    so a bad one is reported instead of silently skipped."""
    out = Listing()
    for p in paths:
        path = Path(p)
        if path.is_file():
            out.items.append(str(path))
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    (out.items if is_image_name(name) else out.skipped).append(full)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return out


def class_folders(root: str | Path) -> list[tuple[str, list[str]]]:
    """A labelled folder: one subfolder per class. Returns (label, image paths), in the order of
    the folder's labels.txt when it has one, else sorted by label."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder (expected one subfolder per class)")
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [str(f) for f in sorted(d.rglob("*")) if f.is_file() and is_image_name(f.name)]
        if files:
            classes.append((d.name, files))
    if len(classes) < 2:
        raise UsageError(f"{root}: needs at least two subfolders of images, one per class")
    order_file = root / "labels.txt"  # optional: the label order to report in
    if order_file.is_file():
        order = {lab.strip(): i for i, lab in enumerate(order_file.read_text().splitlines()) if lab.strip()}
        classes.sort(key=lambda c: (order.get(c[0], len(order)), c[0]))
    return classes


def normalise_source(source: str) -> str:
    """One spelling per source, so `--resume` matches: absolute paths for local folders."""
    if source.startswith("s3://"):
        return source
    return str(Path(source).expanduser().resolve())


class SourceScan:
    """The images under a source, as (uri, etag, size), listed while they are consumed.

    A local folder (absolute paths) or an ``s3://bucket/prefix`` (paged listing).
    ``skipped`` counts the objects seen so far that are not images by name; ``progress``
    is called with the number of objects seen."""

    def __init__(self, source: str, s3_endpoint_url: str | None = None,
                 progress: Callable[[int], object] | None = None):
        self.source, self.endpoint, self.progress = source, s3_endpoint_url, progress
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[str, str | None, int | None]]:
        from orchestrator import s3

        if s3.is_s3(self.source):
            for obj in s3.list_objects(self.source, self.endpoint):
                if is_image_name(obj.uri):  # zero-byte images are kept and fail with a reason
                    yield obj.uri, obj.etag, obj.size
                else:
                    self.skipped += 1
                if self.progress:
                    self.progress(1)
            return
        path = Path(self.source).expanduser()
        if not path.exists():
            raise UsageError(f"{self.source}: no such file or folder (for a bucket write s3://BUCKET/PREFIX)")
        listing = list_local([str(path)])
        self.skipped = len(listing.skipped)
        for p in listing.items:
            full = Path(p).resolve()
            st = full.stat()
            yield str(full), f"{st.st_mtime_ns:x}-{st.st_size:x}", st.st_size
            if self.progress:
                self.progress(1)


def in_background(items: Iterable[T], chunk: int = 1_000, depth: int = 16) -> Iterator[list[T]]:
    """Iterate ``items`` in a thread, yielding lists of up to ``chunk``: the listing's network
    waits overlap with whatever the consumer does (inserting rows). Errors are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            batch = []
            for x in items:
                batch.append(x)
                if len(batch) >= chunk:
                    q.put(batch)
                    batch = []
                if stop.is_set():
                    return
            if batch:
                q.put(batch)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, name="difflabel-listing", daemon=True)
    t.start()
    try:
        while (got := q.get()) is not done:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)
