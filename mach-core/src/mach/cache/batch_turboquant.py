"""TurboQuant rows of a batch of sequences with ragged lengths, left-padded like ``BatchKVCache``.

The ragged buffers hold packed rows (``uint32 [B, H, T, words + 1]``) in place of keys and
values: a sequence joins with the rows its own cache wrote, so the batch attends over exactly
the codes the sequence would have read alone. Padding rows are zeros (a zero norm), and the
mask hides them as well.
"""

from __future__ import annotations

import mlx.core as mx

from mach.cache.batch_kv import RaggedRows
from mach.cache.turboquant import (
    TurboQuantCodec,
    TurboQuantKVCache,
    attend_rows,
    codecs_for,
    encode_rows,
)


class BatchTurboQuantCache(RaggedRows):
    """Full attention of a batch over TurboQuant codes of ``bits`` per coordinate."""

    kind = "turboquant"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self._codecs: tuple[TurboQuantCodec, TurboQuantCodec] | None = None

    def add_row(self, cache: TurboQuantKVCache) -> None:
        if cache.bits != self.bits:
            raise ValueError(f"a {cache.bits}-bit TurboQuant cache cannot join a "
                             f"{self.bits}-bit batch")  # fmt: skip
        state = cache.state
        k_rows, v_rows = state if state is not None else (None, None)
        self._join(k_rows, v_rows, cache.offset)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float,
               sinks: mx.array | None = None) -> mx.array:  # fmt: skip
        """Append every row's new keys and values, then attention of ``queries`` over each
        row's own positions (causal within the new block)."""
        dim = keys.shape[-1]
        if self._codecs is None or self._codecs[0].dim != dim:
            self._codecs = codecs_for(dim, self.bits)
        k_rows, v_rows = encode_rows(keys, values, self._codecs, self.length + keys.shape[2])
        self._append(k_rows, v_rows, spare=True)
        assert self.keys is not None and self.values is not None
        mask = "causal" if queries.shape[2] > 1 else None
        return attend_rows(queries, self._codecs, (self.keys, self.values), self.length, scale,
                           mask, sinks, self.padding)  # fmt: skip
