"""Attention caches of a batch of sequences with ragged lengths: rows left-padded to one length.

Each row ends at the buffer's last position; the positions before a row's own start are padding
that its mask hides. A row joins with its per-sequence cache (``add_row``) and leaves by being
dropped (``keep_rows``); padding that every row shares is cut off. ``offset`` is each row's own
position count, an array, so rotary embeddings rotate every row by its own position.
"""

from __future__ import annotations

import mlx.core as mx

from mach.cache.kv import KVCache
from mach.cache.rotating import RotatingKVCache


def _left_pad(x: mx.array, length: int) -> mx.array:
    """``x`` ``[B, H, T, D]`` with zeros before it along the positions, to ``length``."""
    if x.shape[2] == length:
        return x
    widths = [(0, 0), (0, 0), (length - x.shape[2], 0), (0, 0)]
    return mx.pad(x, widths)


def visible_rows(padding: list[int], queries: int, keys: int, window: int | None) -> mx.array:
    """``[B, 1, queries, keys]``: not padding, not later than the query, within ``window``.

    Queries sit at the end of the key sequence (the last ``queries`` positions).
    """
    k = mx.arange(keys)[None, :]
    q = mx.arange(keys - queries, keys)[:, None]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    pad = mx.array(padding)[:, None, None, None]
    return allowed[None, None] & (k[None, None] >= pad)


class RaggedRows:
    """Keys and values ``[B, H, T, D]`` with per-row left padding; what both caches share.

    The buffers may hold spare positions past the ``length`` in use, so that appending a
    decode step writes in place instead of copying every row.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self._used = 0
        self.padding: list[int] = []
        """Leading positions of each row that belong to no sequence."""
        self.positions: list[int] = []
        """Positions each row's sequence has processed (its RoPE offset)."""

    @property
    def rows(self) -> int:
        return len(self.padding)

    @property
    def length(self) -> int:
        """Positions in use, padding included."""
        return self._used

    @property
    def offset(self) -> mx.array:
        return mx.array(self.positions)

    def held(self) -> tuple[mx.array, mx.array] | None:
        """The keys and values in use, ``[B, H, length, D]``."""
        if self.keys is None or self.values is None:
            return None
        return self.keys[:, :, : self._used], self.values[:, :, : self._used]

    def _set(self, keys: mx.array, values: mx.array) -> None:
        self.keys, self.values, self._used = keys, values, keys.shape[2]

    def _join(self, keys: mx.array | None, values: mx.array | None, positions: int) -> None:
        held, before = (0 if keys is None else keys.shape[2]), self._used
        length = max(before, held)
        mine = self.held()
        if keys is not None and values is not None:
            if mine is None:
                _, h, _, d = keys.shape
                mine = (mx.zeros((self.rows, h, 0, d), keys.dtype),
                        mx.zeros((self.rows, h, 0, values.shape[3]), values.dtype))  # fmt: skip
            self._set(
                mx.concatenate([_left_pad(mine[0], length), _left_pad(keys, length)]),
                mx.concatenate([_left_pad(mine[1], length), _left_pad(values, length)]),
            )
        elif mine is not None:
            k, v = mine
            self._set(mx.concatenate([k, mx.zeros((1, *k.shape[1:]), k.dtype)]),
                      mx.concatenate([v, mx.zeros((1, *v.shape[1:]), v.dtype)]))  # fmt: skip
        self.padding = [p + length - before for p in self.padding]
        self.padding.append(length - held)
        self.positions.append(positions)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); the padding all of them share is cut off."""
        self.padding = [self.padding[r] for r in rows]
        self.positions = [self.positions[r] for r in rows]
        mine = self.held()
        if mine is None:
            return
        index = mx.array(rows, dtype=mx.int32)
        shared = min(self.padding, default=0)
        self._set(mine[0][index, :, shared:], mine[1][index, :, shared:])
        self.padding = [p - shared for p in self.padding]

    def _append(self, keys: mx.array, values: mx.array, spare: bool) -> None:
        """Add new positions at the end of every row; ``spare`` grows the buffer in steps."""
        new = keys.shape[2]
        mine = self.held()
        if mine is None:
            self._set(keys, values)
        elif (
            self.keys is not None
            and self.values is not None
            and (self._used + new <= self.keys.shape[2])
        ):
            self.keys[:, :, self._used : self._used + new] = keys
            self.values[:, :, self._used : self._used + new] = values
            self._used += new
        else:
            parts_k, parts_v = [mine[0], keys], [mine[1], values]
            if spare:
                b, h, _, d = keys.shape
                parts_k.append(mx.zeros((b, h, self.step, d), keys.dtype))
                parts_v.append(mx.zeros((b, h, self.step, values.shape[3]), values.dtype))
            used = self._used + new
            self.keys = mx.concatenate(parts_k, axis=2)
            self.values = mx.concatenate(parts_v, axis=2)
            self._used = used
        self.positions = [p + new for p in self.positions]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.values) if a is not None)


class BatchKVCache(RaggedRows):
    """Full attention of a batch: every position of every row is kept."""

    kind = "kv"

    def add_row(self, cache: KVCache) -> None:
        state = cache.state
        keys, values = state if state is not None else (None, None)
        self._join(keys, values, cache.offset)

    def reserve(self, new: int) -> tuple[mx.array, mx.array]:
        """The buffers, grown to a multiple of ``step`` positions so ``new`` more fit."""
        if self.keys is None or self.values is None:
            raise ValueError("an empty batch cache has no buffers to reserve in")
        need = self._used + new
        if need > self.keys.shape[2]:
            grow = -(-need // self.step) * self.step - self.keys.shape[2]
            b, h, _, d = self.keys.shape
            self.keys = mx.concatenate([self.keys, mx.zeros((b, h, grow, d), self.keys.dtype)],
                                       axis=2)  # fmt: skip
            spare = mx.zeros((b, h, grow, self.values.shape[3]), self.values.dtype)
            self.values = mx.concatenate([self.values, spare], axis=2)
        return self.keys, self.values

    def commit(self, keys: mx.array, values: mx.array, new: int) -> None:
        """Adopt buffers a compiled pass wrote ``new`` positions into, after ``length``."""
        assert self.keys is not None and keys.shape == self.keys.shape
        self.keys, self.values = keys, values
        self._used += new
        self.positions = [p + new for p in self.positions]

    def update_and_mask(
        self, keys: mx.array, values: mx.array, window: int | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Append every row's new positions; return all keys, values and the attention mask."""
        self._append(keys, values, spare=True)
        held = self.held()
        assert held is not None
        mask = visible_rows(self.padding, keys.shape[2], self.length, window)
        return held[0], held[1], mask


class BatchRotatingKVCache(RaggedRows):
    """Sliding-window attention of a batch: each row holds its last ``window - 1`` positions."""

    kind = "rotating"

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def add_row(self, cache: RotatingKVCache) -> None:
        if cache.window != self.window:
            raise ValueError(
                f"a window-{cache.window} cache cannot join a window-{self.window} batch"
            )
        self._join(cache.keys, cache.values, cache.offset)

    def update_and_mask(
        self, keys: mx.array, values: mx.array, window: int | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Append new positions; return what to attend, its mask, then keep only the window."""
        self._append(keys, values, spare=False)
        held = self.held()
        assert held is not None
        mask = visible_rows(self.padding, keys.shape[2], self.length, self.window)
        drop = max(0, self.length - (self.window - 1))
        if drop:
            self._set(held[0][:, :, drop:], held[1][:, :, drop:])
            self.padding = [max(0, p - drop) for p in self.padding]
        return held[0], held[1], mask
