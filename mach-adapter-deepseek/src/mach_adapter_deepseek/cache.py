"""``CompressedCache``: one DeepSeek-V4 layer's attention state for a batch of sequences.

It holds the sliding window of shared key/value rows and, on compressed layers, one
``CompressorState`` per compressor (the attention's, and on CSA layers the indexer's). A
compressor state keeps the entries emitted so far plus the raw projected rows of the last few
windows: the unfinished window waiting to close, the previous window that overlapping
compression reads again, and enough history that ``trim`` can step back over a rejected
speculative draft and rebuild everything from rows alone.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mach.cache.snapshot import LayerState, check_kind, present
from mach.decode.speculative import MAX_DRAFT_TOKENS

TRIM_CAPACITY = 2 * MAX_DRAFT_TOKENS
"""Positions ``trim`` can always drop: room for the engine's longest draft and then some."""


class CompressorState:
    """Entries ``[B, T, d]`` emitted so far, and raw ``kv``/``gate`` rows from ``row_start``."""

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio
        self.entries: mx.array | None = None
        self.kv: mx.array | None = None
        self.gate: mx.array | None = None
        self.row_start = 0
        self.tokens = 0

    @property
    def count(self) -> int:
        return 0 if self.entries is None else int(self.entries.shape[1])

    def append(self, kv: mx.array, gate: mx.array) -> tuple[mx.array, mx.array, int, int]:
        """Add rows; returns all kept rows, their first position and the windows now closed."""
        self.tokens += kv.shape[1]
        if self.kv is not None and self.gate is not None:
            kv = mx.concatenate([self.kv, kv], axis=1)
            gate = mx.concatenate([self.gate, gate], axis=1)
        self.kv, self.gate = kv, gate
        return kv, gate, self.row_start, self.tokens // self.ratio

    def extend(self, new_entries: mx.array) -> mx.array:
        """Store newly emitted entries; drop raw rows no later step or trim will read."""
        if new_entries.shape[1]:
            self.entries = (new_entries if self.entries is None
                            else mx.concatenate([self.entries, new_entries], axis=1))  # fmt: skip
        keep_from = max(0, ((self.tokens - TRIM_CAPACITY) // self.ratio - 1) * self.ratio)
        if keep_from > self.row_start and self.kv is not None and self.gate is not None:
            cut = keep_from - self.row_start
            self.kv, self.gate = self.kv[:, cut:], self.gate[:, cut:]
            self.row_start = keep_from
        assert self.entries is not None or self.tokens < self.ratio
        return self.entries if self.entries is not None else new_entries

    def trim(self, n: int) -> None:
        self.tokens -= n
        if self.kv is not None and self.gate is not None:
            keep = self.tokens - self.row_start
            self.kv, self.gate = self.kv[:, :keep], self.gate[:, :keep]
        if self.entries is not None:
            self.entries = self.entries[:, : self.tokens // self.ratio]

    def state(self) -> tuple[Any, ...]:
        return (self.entries, self.kv, self.gate, self.row_start, self.tokens)

    def set_state(self, state: tuple[Any, ...]) -> None:
        self.entries, self.kv, self.gate, self.row_start, self.tokens = state

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.entries, self.kv, self.gate) if a is not None)


class CompressedCache:
    """Window rows ``[B, 1, N, D]`` plus the layer's compressor states (by name)."""

    kind = "compressed"

    def __init__(self, window: int, compressors: dict[str, int]) -> None:
        self.window = window
        self.rows: mx.array | None = None
        self._offset = 0
        self.compressors = {name: CompressorState(ratio) for name, ratio in compressors.items()}

    @property
    def offset(self) -> int:
        return self._offset

    def update_and_fetch(self, rows: mx.array) -> tuple[mx.array, int]:
        """Append the new positions' rows; return the rows to attend and the first's position."""
        if self.rows is not None:
            rows = mx.concatenate([self.rows, rows], axis=2)
        held = 0 if self.rows is None else self.rows.shape[2]
        first = self._offset - held
        self._offset += rows.shape[2] - held
        self.rows = rows[:, :, -(self.window - 1 + TRIM_CAPACITY) :]
        return rows, first

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, TRIM_CAPACITY, self._offset)
        if n <= 0:
            return 0
        self._offset -= n
        if self.rows is not None:
            self.rows = self.rows[:, :, : self.rows.shape[2] - n]
        for state in self.compressors.values():
            state.trim(n)
        return n

    def snapshot(self) -> Any:
        return (self.rows, self._offset, {k: s.state() for k, s in self.compressors.items()})

    def restore(self, snapshot: Any) -> None:
        self.rows, self._offset, states = snapshot
        for name, state in states.items():
            self.compressors[name].set_state(state)

    def export_state(self) -> LayerState:
        arrays = present(rows=self.rows)
        meta: dict[str, Any] = {"offset": self._offset, "window": self.window, "compressors": {}}
        for name, s in self.compressors.items():
            for part, array in present(entries=s.entries, kv=s.kv, gate=s.gate).items():
                arrays[f"{name}.{part}"] = array
            meta["compressors"][name] = {"ratio": s.ratio, "row_start": s.row_start,
                                         "tokens": s.tokens}  # fmt: skip
        return LayerState(self.kind, arrays, meta)

    def load_state(self, state: LayerState) -> None:
        check_kind(state, self.kind)
        saved = {n: c["ratio"] for n, c in state.meta["compressors"].items()}
        mine = {n: s.ratio for n, s in self.compressors.items()}
        if state.meta["window"] != self.window or saved != mine:
            raise ValueError(
                f"compressed state (window {state.meta['window']}, compressors {saved}) does not "
                f"fit this layer (window {self.window}, compressors {mine})"
            )
        self.rows, self._offset = state.arrays.get("rows"), int(state.meta["offset"])
        for name, s in self.compressors.items():
            c = state.meta["compressors"][name]
            parts = [state.arrays.get(f"{name}.{p}") for p in ("entries", "kv", "gate")]
            s.set_state((*parts, int(c["row_start"]), int(c["tokens"])))

    @property
    def state(self) -> list[mx.array]:
        """Arrays to evaluate after a prefill chunk."""
        arrays = [self.rows] + [a for s in self.compressors.values()
                                for a in (s.entries, s.kv, s.gate)]  # fmt: skip
        return [a for a in arrays if a is not None]

    @property
    def nbytes(self) -> int:
        own = self.rows.nbytes if self.rows is not None else 0
        return own + sum(s.nbytes for s in self.compressors.values())
