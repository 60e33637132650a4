"""Decode image bytes or files into RGB/L PIL images, with one-line errors.

No torch here. Any failure is a ``BadImageError`` naming the input; callers fail that
item only. Handles the modes real buckets contain: CMYK, 16-bit, palette and alpha.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import BadImageError, first_line

#: File name endings treated as images when a folder or prefix is listed.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Largest image accepted, in pixels (width x height); callers pass the worker's setting
#: (DIFFLABEL_MAX_IMAGE_PIXELS, read once in orchestrator.settings).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode(data: bytes | Path | str, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode ``data`` (bytes or a path) into an RGB image; raise BadImageError on failure.
    ``max_pixels``: the largest image accepted (default DEFAULT_MAX_IMAGE_PIXELS)."""
    label = name or (str(data) if not isinstance(data, bytes) else "<bytes>")
    if isinstance(data, bytes) and not data:
        raise BadImageError(f"{label}: empty file (0 bytes)")
    limit = max_pixels if max_pixels is not None else DEFAULT_MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below applies, and is configurable
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
    except OSError as e:
        raise BadImageError(f"{label}: cannot open ({e.strerror or e})") from e
    try:
        with src, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
            w, h = im.size
            if w * h > limit:
                raise BadImageError(
                    f"{label}: image too large ({w}x{h} = {w * h:,} pixels > {limit:,}); "
                    "raise DIFFLABEL_MAX_IMAGE_PIXELS to accept it"
                )
            if im.format == "JPEG":
                im.draft("RGB", (1024, 1024))  # decode big JPEGs at reduced size
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: upright as displayed
            return to_rgb(im)
    except BadImageError:
        raise
    except UnidentifiedImageError as e:
        raise BadImageError(f"{label}: not an image in a format difflabel reads (PNG, JPEG, ...)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{label}: image too large ({first_line(e, None)}); "
                            "raise DIFFLABEL_MAX_IMAGE_PIXELS to accept it") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImageError(f"{label}: corrupt or truncated image ({first_line(e, None)})") from e
    except MemoryError as e:
        raise BadImageError(f"{label}: out of memory decoding the image") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on black; 16-bit and float are rescaled."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np  # rare path; the CLI imports this module and should start fast

        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")
