"""Manifold-constrained hyper-connections: ``hc_mult`` residual streams instead of one.

Each sublayer reads a weighted sum of the streams (``pre``), writes its output back to every
stream (``post``) and mixes the streams through a doubly stochastic matrix (``comb``, projected
by Sinkhorn iterations). All of it runs in float32, as the reference keeps these in float32.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn


def _unit_rms(x: mx.array, eps: float) -> mx.array:
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)


class HyperConnection(nn.Module):
    """``(collapsed [B,L,D], post [B,L,n], comb [B,L,n,n]) = hc(streams [B,L,n,D])``."""

    def __init__(self, hc_mult: int, hidden_size: int, iters: int, eps: float,
                 norm_eps: float) -> None:  # fmt: skip
        super().__init__()  # type: ignore[no-untyped-call]
        width = (2 + hc_mult) * hc_mult
        self.fn = mx.zeros((width, hc_mult * hidden_size))
        self.base = mx.zeros((width,))
        self.scale = mx.ones((3,))
        self.n, self.iters, self.eps, self.norm_eps = hc_mult, iters, eps, norm_eps
        # One compiled graph instead of ~4 * iters tiny ops per sublayer and token.
        self._weights = mx.compile(partial(_mix_weights, n=hc_mult, iters=iters, eps=eps))

    def __call__(self, streams: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        flat = _unit_rms(streams.reshape(*streams.shape[:2], -1).astype(mx.float32), self.norm_eps)
        mixes = flat @ self.fn.astype(mx.float32).T
        pre, post, comb = self._weights(mixes, self.base.astype(mx.float32),
                                        self.scale.astype(mx.float32))  # fmt: skip
        collapsed = (pre[..., None] * streams.astype(mx.float32)).sum(axis=2)
        return collapsed.astype(streams.dtype), post, comb


def _mix_weights(mixes: mx.array, base: mx.array, scale: mx.array, n: int, iters: int,
                 eps: float) -> tuple[mx.array, mx.array, mx.array]:  # fmt: skip
    """``pre``, ``post`` and the Sinkhorn-projected ``comb`` from the streams' projection."""
    pre = mx.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * mx.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = mixes[..., 2 * n :].reshape(*mixes.shape[:-1], n, n) * scale[2]
    comb = mx.softmax(comb + base[2 * n :].reshape(n, n), axis=-1) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return pre, post, comb


def expand(streams: mx.array, output: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """``post ⊗ output + combᵀ @ streams``: the sublayer's output written back to every stream."""
    dtype = streams.dtype
    mixed = mx.swapaxes(comb.astype(dtype), -1, -2) @ streams
    return post.astype(dtype)[..., None] * output[..., None, :] + mixed


class HyperHead(nn.Module):
    """The final collapse of the streams into one hidden state, before the last norm."""

    def __init__(self, hc_mult: int, hidden_size: int, eps: float, norm_eps: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hc_fn = mx.zeros((hc_mult, hc_mult * hidden_size))
        self.hc_base = mx.zeros((hc_mult,))
        self.hc_scale = mx.ones((1,))
        self.eps, self.norm_eps = eps, norm_eps

    def __call__(self, streams: mx.array) -> mx.array:
        flat = _unit_rms(streams.reshape(*streams.shape[:2], -1).astype(mx.float32), self.norm_eps)
        mixes = flat @ self.hc_fn.astype(mx.float32).T
        pre = mx.sigmoid(mixes * self.hc_scale.astype(mx.float32) + self.hc_base) + self.eps
        return (pre[..., None] * streams.astype(mx.float32)).sum(axis=2).astype(streams.dtype)
