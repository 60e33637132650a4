"""Worker policy: hand freed heap pages back to the OS after each task.

Every round allocates tensors of a different size; glibc keeps the freed space in its arenas,
so a long-running worker's resident memory would creep up job after job (bench/memory.py)."""

from __future__ import annotations

_TRIM = None


def release_memory() -> None:
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)
