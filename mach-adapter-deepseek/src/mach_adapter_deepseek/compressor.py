"""Compressors: pool every ``ratio`` tokens' projected rows into one attention entry.

Each token projects to ``kv`` and ``gate`` rows; a closed window's entry is the per-channel
softmax(gate + position_bias)-weighted sum of its rows, RMS-normalised and rotated to the
window's first position. Overlapping compressors (CSA and its indexer) project twice the width:
the first half of each row belongs to the *next* window's entry and the second half to its own,
so entry ``w`` pools ``2 * ratio`` slots: window ``w-1``'s first halves, then window ``w``'s
second halves. Entry ``w`` becomes visible to the query at position ``t`` once
``w < (t + 1) // ratio``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mach_adapter_deepseek.cache import CompressorState
from mach_adapter_deepseek.rope import RotaryTable, Rotation


class Compressor(nn.Module):
    def __init__(self, hidden: int, head_dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        width = (2 if overlap else 1) * head_dim
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = mx.zeros((ratio, width))
        self.kv_norm = nn.RMSNorm(head_dim, eps=eps)
        self.ratio, self.overlap, self.head_dim = ratio, overlap, head_dim

    def __call__(self, x: mx.array, state: CompressorState, rope: RotaryTable) -> mx.array:
        """Feed ``x [B, L, H]``; returns every entry emitted so far ``[B, T, head_dim]``."""
        before = state.count
        rows_kv, rows_gate, row_start, closed = state.append(self.kv_proj(x), self.gate_proj(x))
        if closed == before:
            return state.extend(rows_kv[:, :0, : self.head_dim])
        m, d = self.ratio, self.head_dim
        first = before - 1 if self.overlap and before > 0 else before
        lo, hi = first * m - row_start, closed * m - row_start
        kv = rows_kv[:, lo:hi].reshape(x.shape[0], closed - first, m, -1)
        gate = rows_gate[:, lo:hi].reshape(x.shape[0], closed - first, m, -1).astype(mx.float32)
        gate = gate + self.position_bias.astype(mx.float32)
        if self.overlap:
            # Slots: the previous window's first halves, then this window's second halves.
            prev_kv, prev_gate = kv[..., :d], gate[..., :d]
            kv, gate = kv[..., d:], gate[..., d:]
            if first == before:  # the very first window has no predecessor: weight 0
                pad_kv = mx.zeros_like(prev_kv[:, :1])
                pad_gate = mx.full(prev_gate[:, :1].shape, -mx.inf, dtype=mx.float32)
                prev_kv = mx.concatenate([pad_kv, prev_kv], axis=1)
                prev_gate = mx.concatenate([pad_gate, prev_gate], axis=1)
            else:
                kv, gate = kv[:, 1:], gate[:, 1:]
            kv = mx.concatenate([prev_kv[:, :-1], kv], axis=2)
            gate = mx.concatenate([prev_gate[:, :-1], gate], axis=2)
        weights = mx.softmax(gate, axis=2).astype(kv.dtype)
        pooled = self.kv_norm((kv * weights).sum(axis=2))
        positions = mx.arange(before, closed) * m
        return state.extend(rope.apply(pooled, positions))


def visible_entries(positions: mx.array, count: int, ratio: int) -> mx.array:
    """``[L, T]``: entry ``w`` is visible to the query at position ``t`` iff w < (t+1)//ratio."""
    return mx.arange(count)[None, :] < ((positions + 1) // ratio)[:, None]


def top_k_lowest_first(scores: mx.array, k: int) -> mx.array:
    """Indices ``[..., k]`` of the ``k`` largest scores (in no order); of equal scores the lowest
    index wins. Index scores are sums of ReLUs, so exact ties at zero are common and a sort's
    unspecified tie order would make the choice depend on the backend and the batch shape."""
    kth = mx.topk(scores, k, axis=-1).min(axis=-1, keepdims=True)
    above, equal = scores > kth, scores == kth
    room = k - above.sum(axis=-1, keepdims=True)
    chosen = above | (equal & (mx.cumsum(equal.astype(mx.int32), axis=-1) <= room))
    return mx.argpartition(1 - chosen.astype(mx.int32), kth=k - 1, axis=-1)[..., :k]


Selection = tuple[mx.array, mx.array]
"""``(picked [B, L, k], valid [B, L, k])``: entry ids each query keeps, and which are real."""


class Indexer(nn.Module):
    """The lightning indexer: picks the ``topk`` compressed entries each query attends to."""

    def __init__(self, hidden: int, q_rank: int, heads: int, head_dim: int, ratio: int,
                 topk: int, eps: float) -> None:  # fmt: skip
        super().__init__()  # type: ignore[no-untyped-call]
        self.compressor = Compressor(hidden, head_dim, ratio, overlap=True, eps=eps)
        self.q_b_proj = nn.Linear(q_rank, heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden, heads, bias=False)
        self.heads, self.head_dim, self.ratio, self.topk = heads, head_dim, ratio, topk

    def __call__(self, x: mx.array, q_residual: mx.array, positions: mx.array,
                 rotation: Rotation, state: CompressorState,
                 rope: RotaryTable) -> Selection | None:  # fmt: skip
        """The entries each query keeps: ``(picked [B, L, k], valid [B, L, k])``.

        ``None`` when every visible entry is kept (no more entries than ``topk``).
        """
        keys = self.compressor(x, state, rope)
        b, length, _ = x.shape
        count = keys.shape[1]
        k = min(self.topk, count)
        if k == count:
            return None
        q = self.q_b_proj(q_residual).reshape(b, length, self.heads, self.head_dim)
        q = rotation.apply(q.transpose(0, 2, 1, 3)).astype(mx.float32)  # [B, H, L, d]
        weights = self.weights_proj(x).astype(mx.float32) * self.heads**-0.5  # [B, L, H]
        keys_t = keys.astype(mx.float32).swapaxes(-1, -2)[:, None]  # [B, 1, d, T]
        scores = mx.zeros((b, length, count), dtype=mx.float32)
        # Head by head, so long contexts never hold a [B, L, heads, entries] tensor.
        for h in range(self.heads):
            per_head = mx.maximum(q[:, h : h + 1] @ keys_t, 0)[:, 0]  # [B, L, T]
            scores = scores + per_head * weights[..., h : h + 1]
        scores = scores * self.head_dim**-0.5
        visible = visible_entries(positions, count, self.ratio)
        scores = mx.where(visible, scores, -mx.inf)
        picked = top_k_lowest_first(scores, k)
        valid = picked < ((positions + 1) // self.ratio)[:, None]
        return picked, mx.broadcast_to(valid, picked.shape)
