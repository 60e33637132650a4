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
    """A labelled folder: one subfolder per class. Returns (label, image paths) sorted by label."""
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
    return classes
