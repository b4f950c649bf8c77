"""Handing freed heap memory back to the operating system after a large request."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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
    """Collect a large request's leftovers and return free heap pages to the OS.

    Exceptions with tracebacks keep a request's prompt alive in reference cycles, and glibc
    keeps what a large tokenization freed in its arenas: without this one big prompt leaves
    the process much larger for good. Other allocators give memory back by themselves.
    """
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
