"""``RotatingKVCache``: keys and values of a sliding-window layer, bounded by the window."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mach.cache.snapshot import LayerState, check_kind, present

TRIM_SLACK = 16
"""Positions kept beyond the window so a speculative verify pass can be rolled back (the most
drafts one pass checks)."""


class RotatingKVCache:
    """Holds the last ``window - 1`` positions, plus ``TRIM_SLACK`` more so the newest can be
    trimmed; each call sees those plus its own new ones (attention masks by the window)."""

    kind = "rotating"

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append new positions; return the keys and values to attend and the first's position."""
        if self.keys is not None and self.values is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        start = self._offset - (0 if self.keys is None else self.keys.shape[2])
        self._offset += keys.shape[2] - (0 if self.keys is None else self.keys.shape[2])
        keep = self.window - 1 + TRIM_SLACK
        self.keys, self.values = keys[..., -keep:, :], values[..., -keep:, :]
        return keys, values, start

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` positions (at most ``TRIM_SLACK`` past a full window)."""
        if self.keys is None or self.values is None or n <= 0:
            return 0
        held = self.keys.shape[2]
        n = min(n, held, max(0, held - (self.window - 1)) if held < self._offset else held)
        self.keys, self.values = self.keys[..., : held - n, :], self.values[..., : held - n, :]
        self._offset -= n
        return n

    def snapshot(self) -> Any:
        return (self.keys, self.values, self._offset)

    def restore(self, snapshot: Any) -> None:
        self.keys, self.values, self._offset = snapshot

    def export_state(self) -> LayerState:
        meta = {"offset": self._offset, "window": self.window}
        return LayerState(self.kind, present(keys=self.keys, values=self.values), meta)

    def load_state(self, state: LayerState) -> None:
        check_kind(state, self.kind)
        if state.meta["window"] != self.window:
            raise ValueError(
                f"rotating state has window {state.meta['window']}, this cache {self.window}"
            )
        self.keys, self.values = state.arrays.get("keys"), state.arrays.get("values")
        self._offset = int(state.meta["offset"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.values) if a is not None)
