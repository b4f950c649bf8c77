"""Give MLX's Linux CPU backend an optimized BLAS when the system has one.

The Linux ``mlx[cpu]`` wheel links the reference BLAS it bundles, which makes matrix products
(prefill, batched decode) dozens of times slower than OpenBLAS. Loading a system OpenBLAS into
the global symbol scope before MLX is imported makes MLX resolve its BLAS calls there.
``MACH_BLAS=reference`` keeps the bundled BLAS; ``MACH_BLAS=/path/to/libopenblas.so`` picks one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None
"""The BLAS library mach loaded for MLX, or ``None``."""


def use_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux unless MLX is already imported; returns its path."""
    global loaded
    choice = os.environ.get("MACH_BLAS", "")
    if sys.platform != "linux" or choice == "reference" or "mlx.core" in sys.modules:
        return loaded
    found = ctypes.util.find_library("openblas")
    candidates = [choice] if choice else [*([found] if found else []), *_CANDIDATES]
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        break
    return loaded
