"""Scaled dot-product attention over an optional per-layer KV cache."""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from mach.cache.affine_kv import AffineKVCache
from mach.cache.batch_kv import BatchKVCache, BatchRotatingKVCache
from mach.cache.batch_turboquant import BatchTurboQuantCache
from mach.cache.kv import KVCache
from mach.cache.rotating import RotatingKVCache
from mach.cache.traced_kv import TracedKVCache
from mach.cache.turboquant import TurboQuantKVCache


def window_mask(queries: int, first_query: int, keys: int, first_key: int, window: int) -> mx.array:
    """``[queries, keys]``: key visible to query iff it is not later and within ``window``."""
    q = mx.arange(first_query, first_query + queries)[:, None]
    k = mx.arange(first_key, first_key + keys)[None, :]
    return (k <= q) & (k > q - window)


BUCKETED_BLOCK = 64
"""The longest query block that attends over a cache's whole buffer (``keys_in_buckets``)."""


def keys_in_buckets() -> bool:
    """Whether short query blocks attend over the cache's whole preallocated buffer.

    On a CUDA GPU, MLX builds a cuDNN attention graph for each new shape of a multi-query
    call, and the key count of a verify pass or a draft block grows every pass: each one
    would build a graph (tens of milliseconds). The buffer grows in steps of 256 positions, so
    attending over all of it, with the rows past the block masked, keeps the shapes in a few
    buckets. A CPU or a Metal GPU has no per-shape cost and reads exactly the positions it
    needs.
    """
    return mx.default_device() != mx.cpu and mx.cuda.is_available()


def attend_block(
    queries: mx.array,
    cache: KVCache,
    visible: int,
    scale: float,
    causal: bool,
    sinks: mx.array | None = None,
) -> mx.array:
    """Queries ``[B, H, L, D]`` over the first ``visible`` positions of ``cache``.

    The queries are the last ``L`` of those positions; ``causal`` keeps each from the ones
    after it, otherwise the block's rows all see each other.
    """
    assert cache.keys is not None and cache.values is not None
    length = queries.shape[2]
    if not (length <= BUCKETED_BLOCK and keys_in_buckets()):
        keys, values = cache.keys[..., :visible, :], cache.values[..., :visible, :]
        mask = "causal" if causal and length > 1 else None
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask, sinks=sinks
        )
    bias = _block_bias(cache.keys.shape[2], visible, length, causal, queries.dtype)
    return mx.fast.scaled_dot_product_attention(
        queries, cache.keys, cache.values, scale=scale, mask=bias, sinks=sinks
    )


@functools.lru_cache(maxsize=8)
def _block_bias(buffer: int, visible: int, length: int, causal: bool, dtype: mx.Dtype) -> mx.array:
    """``[length, buffer]`` additive mask of ``attend_block``; every layer of a pass shares it."""
    positions = mx.arange(buffer)[None, :]
    if causal:
        seen = positions <= mx.arange(visible - length, visible)[:, None]
    else:
        seen = mx.broadcast_to(positions < visible, (length, buffer))
    return mx.where(seen, 0.0, -mx.inf).astype(dtype)


def attend(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    sinks: mx.array | None = None,
    window: int | None = None,
) -> mx.array:
    """Causal attention of ``queries`` ``[B, H, L, D]`` over cached and new keys.

    New keys and values are appended to ``cache`` (``KVCache`` or ``RotatingKVCache``, or their
    batched forms, whose rows carry their own padding masks) when one is given. Queries sit at
    the end of the key sequence, so the causal mask is bottom-right aligned. ``window`` limits
    each query to that many most recent positions (itself included); ``sinks`` adds a learned
    per-head logit to every softmax.
    """
    length = queries.shape[2]
    if isinstance(cache, TracedKVCache):
        return cache.attend(queries, keys, values, scale, sinks, window)
    if isinstance(cache, BatchKVCache | BatchRotatingKVCache):
        keys, values, visible = cache.update_and_mask(keys, values, window)
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=visible, sinks=sinks
        )
    if isinstance(cache, BatchTurboQuantCache):
        if window is not None:
            raise ValueError("quantized KV caches serve full-attention layers only")
        return cache.attend(queries, keys, values, scale, sinks)
    if isinstance(cache, TurboQuantKVCache | AffineKVCache):
        if window is not None:
            raise ValueError("quantized KV caches serve full-attention layers only")
        return cache.attend(queries, keys, values, scale, "causal" if length > 1 else None,
                            sinks)  # fmt: skip
    first_query = cache.offset if cache is not None else 0
    first_key = 0
    if isinstance(cache, RotatingKVCache):
        keys, values, first_key = cache.update_and_fetch(keys, values)
    elif isinstance(cache, KVCache):
        if window is None and length > 1:
            cache.update_and_fetch(keys, values)
            return attend_block(queries, cache, cache.offset, scale, True, sinks)
        keys, values = cache.update_and_fetch(keys, values)
    mask: str | mx.array | None
    if window is not None and (length > 1 or keys.shape[2] > window):
        mask = window_mask(length, first_query, keys.shape[2], first_key, window)
    else:
        mask = "causal" if length > 1 else None
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks
    )
