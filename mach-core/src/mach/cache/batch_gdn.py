"""``BatchGDNCache``: Gated DeltaNet state of a batch, one row per sequence.

A recurrent state has no positions to pad: each row's conv tail and state are its own, and a
batched decode step advances every row by one token. A row whose sequence has processed no
token yet holds zeros, which is the state the layer starts from.
"""

from __future__ import annotations

import mlx.core as mx

from mach.cache.gdn import GDNCache


def _stacked(mine: mx.array | None, rows: int, new: mx.array | None) -> mx.array | None:
    """``mine`` (``rows`` rows, or ``None`` for all-zero) with ``new`` added as one more row."""
    if mine is None and new is None:
        return None
    like = new if new is not None else mine
    assert like is not None
    one = mx.zeros((1, *like.shape[1:]), like.dtype)
    if mine is None:
        mine = mx.zeros((rows, *like.shape[1:]), like.dtype)
    return mx.concatenate([mine, new if new is not None else one])


class BatchGDNCache(GDNCache):
    """``GDNCache`` whose arrays have one row per sequence of a batch; never recording."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.positions)

    def add_row(self, cache: GDNCache) -> None:
        self.conv_state = _stacked(self.conv_state, self.rows, cache.conv_state)
        self.state = _stacked(self.state, self.rows, cache.state)
        self.positions.append(cache.offset)

    def keep_rows(self, rows: list[int]) -> None:
        index = mx.array(rows, dtype=mx.int32)
        if self.conv_state is not None:
            self.conv_state = self.conv_state[index]
        if self.state is not None:
            self.state = self.state[index]
        self.positions = [self.positions[r] for r in rows]

    def update(self, conv_state: mx.array, state: mx.array, tokens: int,
               steps: list[tuple[mx.array, mx.array]] | None = None) -> None:  # fmt: skip
        super().update(conv_state, state, tokens, steps)
        self.positions = [p + tokens for p in self.positions]

    def start_recording(self) -> None:
        raise ValueError("a batched GDN cache keeps no history; speculative rollback needs one")
