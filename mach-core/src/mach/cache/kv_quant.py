"""Quantized KV caches in place of full-precision ones: TurboQuant, or the affine baseline."""

from __future__ import annotations

from collections.abc import Sequence

from mach.cache.affine_kv import AFFINE_BITS, AffineKVCache
from mach.cache.base import LayerCache
from mach.cache.kv import KVCache
from mach.cache.turboquant import BITS as TURBOQUANT_BITS
from mach.cache.turboquant import TurboQuantKVCache

KV_FORMATS = {"turboquant": TURBOQUANT_BITS, "affine": AFFINE_BITS}
"""Each quantized KV format and the bits it stores per coordinate."""


def quantized_kv(layers: Sequence[LayerCache], kv_format: str, bits: int) -> list[LayerCache]:
    """``layers`` with each full-attention ``KVCache`` replaced by a quantized cache.

    Sliding windows, GDN states and a family's own caches stay as they are: a window is small
    already and recurrent state does not tolerate rounding.
    """

    def swap(layer: LayerCache) -> LayerCache:
        if type(layer) is not KVCache:
            return layer
        return TurboQuantKVCache(bits) if kv_format == "turboquant" else AffineKVCache(bits)

    return [swap(layer) for layer in layers]
