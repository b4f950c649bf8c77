"""``TracedKVCache``: a KV cache's buffers as seen from inside a compiled decode pass."""

from __future__ import annotations

import mlx.core as mx


class TracedKVCache:
    """Stands in for a ``KVCache`` while a pass is traced for ``mx.compile``.

    The write position is an array, not a Python int, so one traced graph serves every
    position of a buffer size: new keys go in with ``slice_update`` at ``offset``, and queries
    attend over the whole buffer with the positions after their own masked. The pass's
    buffers come back out through ``keys`` and ``values``; ``KVCache.commit`` adopts them.
    """

    kind = "kv"

    def __init__(
        self,
        keys: mx.array,
        values: mx.array,
        start: mx.array,
        positions: mx.array | None = None,
        padding: mx.array | None = None,
    ) -> None:
        self.keys, self.values = keys, values
        self.start = start
        """Where the pass's first token goes in the buffer (an int32 scalar array)."""
        self.offset = start if positions is None else positions
        """The first token's position for rotary embeddings: ``start``, or each row's own
        position when a batch's rows are left-padded."""
        self.padding = padding
        """Each row's leading positions that belong to no sequence (a batch), or ``None``."""

    def written(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values

    def write(self, keys: mx.array, values: mx.array) -> None:
        """Put ``keys`` / ``values`` ``[B, H, L, D]`` at the pass's positions."""
        start = self.start.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        scale: float,
        sinks: mx.array | None,
        window: int | None,
    ) -> mx.array:
        """Write the pass's keys and values, then causal attention of its queries (the last
        ``L`` of the written positions)."""
        self.write(keys, values)
        length = queries.shape[2]
        key_positions = mx.arange(self.keys.shape[2])[None, :]
        query_positions = (self.start + (keys.shape[2] - length) + mx.arange(length))[:, None]
        seen = key_positions <= query_positions
        if window is not None:
            seen = seen & (key_positions > query_positions - window)
        return self._attend(queries, seen, scale, sinks)

    def attend_written(
        self, queries: mx.array, keys: mx.array, values: mx.array, scale: float
    ) -> mx.array:
        """Write the pass's keys and values; every query sees every position up to them."""
        self.write(keys, values)
        seen = mx.arange(self.keys.shape[2])[None, :] < self.start + keys.shape[2]
        return self._attend(queries, seen, scale, None)

    def _attend(
        self, queries: mx.array, seen: mx.array, scale: float, sinks: mx.array | None
    ) -> mx.array:
        if self.padding is not None:
            ahead = mx.arange(self.keys.shape[2])[None, :] >= self.padding[:, None]
            seen = seen[None, None] & ahead[:, None, None, :]
        bias = mx.where(seen, 0.0, -mx.inf).astype(queries.dtype)
        return mx.fast.scaled_dot_product_attention(
            queries, self.keys, self.values, scale=scale, mask=bias, sinks=sinks
        )
