"""Routers shared by families: pick ``k`` experts per token and their weights."""

from __future__ import annotations

import mlx.core as mx


def softmax_topk(logits: mx.array, k: int, normalize: bool) -> tuple[mx.array, mx.array]:
    """Softmax over all experts (accumulated in float32), keep the top ``k``, maybe renormalise.

    Returns ``(indices, weights)``, both ``[..., k]``; weights are in the logits' dtype.
    """
    scores = mx.softmax(logits, axis=-1, precise=True)
    indices = mx.argpartition(scores, kth=-k, axis=-1)[..., -k:]
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return indices, weights


def topk_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Keep the top ``k`` logits, then softmax over those ``k`` (float32)."""
    indices = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    picked = mx.take_along_axis(logits, indices, axis=-1).astype(mx.float32)
    return indices, mx.softmax(picked, axis=-1).astype(logits.dtype)
