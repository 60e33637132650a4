"""Where images come from: local files and folders (S3 prefixes are listed in ``s3``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import UsageError
from worker.images import is_image_name


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


@dataclass
class SourceListing:
    """(uri, etag, size) of every image under a source, and how many others were skipped."""

    objects: list[tuple[str, str | None, int | None]] = field(default_factory=list)
    skipped: int = 0


def normalise_source(source: str) -> str:
    """One spelling per source, so `--resume` matches: absolute paths for local folders."""
    if source.startswith("s3://"):
        return source
    return str(Path(source).expanduser().resolve())


def list_source(source: str, s3_endpoint_url: str | None = None,
                progress=None) -> SourceListing:
    """A local folder (absolute paths) or an ``s3://bucket/prefix`` (paged listing)."""
    from orchestrator import s3

    out = SourceListing()
    if s3.is_s3(source):
        for obj in s3.list_objects(source, s3_endpoint_url):
            if is_image_name(obj.uri):  # zero-byte images are kept and fail with a reason
                out.objects.append((obj.uri, obj.etag, obj.size))
            else:
                out.skipped += 1
            if progress:
                progress(1)
        return out
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"{source}: no such file or folder (for a bucket write s3://BUCKET/PREFIX)")
    listing = list_local([str(path)])
    for p in listing.items:
        full = Path(p).resolve()
        st = full.stat()
        out.objects.append((str(full), f"{st.st_mtime_ns:x}-{st.st_size:x}", st.st_size))
    out.skipped = len(listing.skipped)
    return out
