"""Log-probabilities a step reports: the chosen token's and the most likely alternatives."""

from __future__ import annotations

import mlx.core as mx


def token_logprobs(logits: mx.array, token: mx.array, top_n: int) -> tuple[mx.array, ...]:
    """For ``logits`` ``[B, vocab]`` and ``token`` ``[B]``: the chosen log-probability
    ``[B, 1]`` and, when ``top_n``, the top ids and their log-probabilities ``[B, top_n]``."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)
    if not top_n:
        return (chosen,)
    top = mx.argpartition(-logprobs, kth=top_n - 1, axis=-1)[:, :top_n]
    return chosen, top, mx.take_along_axis(logprobs, top, axis=-1)


def best_first(ids: list[int], values: list[float]) -> list[tuple[int, float]]:
    """``(id, logprob)`` pairs, most likely first."""
    return sorted(zip(ids, values, strict=True), key=lambda p: -p[1])
