"""Scaled dot-product attention over an optional per-layer KV cache."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mach.cache.kv import KVCache


def attend(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
) -> mx.array:
    """Causal attention of ``queries`` ``[B, H, L, D]`` over cached and new keys.

    New keys and values are appended to ``cache`` (a ``KVCache``) when one is given. Queries sit
    at the end of the key sequence, so the causal mask is bottom-right aligned.
    """
    if isinstance(cache, KVCache):
        keys, values = cache.update_and_fetch(keys, values)
    mask = "causal" if queries.shape[2] > 1 else None
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
