"""mach: Mixture-of-Experts inference on MLX.

Heavy parts (MLX, the loader) import on first use, so ``import mach`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mach._blas import use_fast_blas

use_fast_blas()

from mach.adapter import ExpertLayout, MoeArchAdapter  # noqa: E402 - after the BLAS choice
from mach.hookspecs import hookimpl  # noqa: E402
from mach.registry import (  # noqa: E402
    REGISTRY,
    arch_summary,
    detect_arch,
    get_adapter,
    list_archs,
)

if TYPE_CHECKING:
    from mach.io.load import load, load_moe

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "ExpertLayout",
    "MoeArchAdapter",
    "__version__",
    "arch_summary",
    "detect_arch",
    "get_adapter",
    "hookimpl",
    "list_archs",
    "load",
    "load_moe",
]


def __getattr__(name: str) -> Any:
    if name in ("load", "load_moe"):
        from mach.io import load as load_module

        return getattr(load_module, name)
    raise AttributeError(f"module 'mach' has no attribute {name!r}")
