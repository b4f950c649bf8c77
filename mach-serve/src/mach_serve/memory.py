"""Handing freed heap memory back to the operating system after a large request."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

LARGE_REQUEST_BYTES = 256 * 2**10


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Return free heap pages to the OS.

    glibc keeps what a large tokenization freed in its arenas, so without this a single big
    prompt leaves the process hundreds of megabytes larger for good. Other allocators already
    give memory back; there this does nothing.
    """
    if _TRIM is not None:
        _TRIM(0)
