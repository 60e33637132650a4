"""Small JPEG thumbnails of job images (a local file or an S3 object), kept in memory.

Callers pass the URI of an item of a job, read from the store: nothing here takes a path from
a request. A thumbnail is made once and kept (least recently used out first, up to
CACHE_BYTES), so a page that polls every few seconds reads each image once.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from orchestrator import s3
from worker.errors import BadImageError, PermanentError
from worker.images import decode

#: Longest side of a thumbnail, in pixels.
THUMB_SIZE = 96
#: Memory kept for thumbnails (about 3 KB each at 96 px: thousands of them).
CACHE_BYTES = 32 * 1024 * 1024
#: Largest image read to make a thumbnail.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class ThumbnailError(PermanentError):
    """The image could not be read or decoded (the item is listed, its image is not usable)."""


def make_thumbnail(data: bytes, name: str, size: int = THUMB_SIZE, max_pixels: int | None = None) -> bytes:
    """``data`` decoded and shrunk to fit ``size`` x ``size`` (never enlarged), as JPEG."""
    from PIL import Image

    im = decode(data, name, max_pixels)  # RGB, upright, bombs refused
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def read_image(uri: str, endpoint_url: str | None) -> bytes:
    if s3.is_s3(uri):
        return s3.get_bytes(uri, endpoint_url, MAX_IMAGE_BYTES)
    p = Path(uri)
    try:
        if p.stat().st_size > MAX_IMAGE_BYTES:
            raise ThumbnailError(f"{uri}: over the {MAX_IMAGE_BYTES:,}-byte limit for thumbnails")
        return p.read_bytes()
    except OSError as e:
        raise ThumbnailError(f"{uri}: cannot read ({e.strerror or type(e).__name__})") from e


class Thumbnails:
    """Thumbnails by key, made on first use and kept in a byte-bounded LRU cache."""

    def __init__(self, endpoint_url: str | None = None, size: int = THUMB_SIZE, max_bytes: int = CACHE_BYTES,
                 max_pixels: int | None = None):
        self.endpoint_url, self.size, self.max_bytes, self.max_pixels = endpoint_url, size, max_bytes, max_pixels
        self._cache: OrderedDict[object, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: object, uri: Callable[[], str | None]) -> bytes | None:
        """The thumbnail under ``key``; on a miss ``uri()`` names the image (None: there is
        none, and None is returned)."""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        where = uri()
        if where is None:
            return None
        try:
            thumb = make_thumbnail(read_image(where, self.endpoint_url), where, self.size, self.max_pixels)
        except BadImageError as e:
            raise ThumbnailError(str(e)) from e
        with self._lock:
            if key not in self._cache:
                self._cache[key] = thumb
                self._bytes += len(thumb)
            while self._bytes > self.max_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._bytes -= len(old)
        return thumb

    def __len__(self) -> int:
        return len(self._cache)
