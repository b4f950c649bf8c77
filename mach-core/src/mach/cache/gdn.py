"""``GDNCache``: a Gated DeltaNet layer's conv window and recurrent state.

A recurrent state cannot be cut back the way a KV cache can. Rollback (speculative decoding)
works instead from recorded states: while ``recording``, the layer stores its state after every
token it processes, and ``trim(n)`` returns to the state ``n`` tokens back. ``snapshot`` /
``restore`` save and bring back the whole state at any point (prefix reuse); MLX arrays are
immutable, so a snapshot costs no copy.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mach.cache.snapshot import LayerState, check_kind, present


class GDNCache:
    """Gated DeltaNet state of one layer: the convolution tail and the recurrent state."""

    kind = "gdn"

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        """The last ``kernel - 1`` inputs of the causal convolution, ``[B, K-1, C]``."""
        self.state: mx.array | None = None
        """The recurrent state, ``[B, H, Dk, Dv]``, float32."""
        self._offset = 0
        self._history: list[tuple[mx.array | None, mx.array | None]] | None = None

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def recording(self) -> bool:
        return self._history is not None

    def start_recording(self) -> None:
        """Keep the state after every following token, so ``trim`` can go back."""
        self._history = [(self.conv_state, self.state)]

    def stop_recording(self) -> None:
        self._history = None

    def update(self, conv_state: mx.array, state: mx.array, tokens: int,
               steps: list[tuple[mx.array, mx.array]] | None = None) -> None:  # fmt: skip
        """Store the state after ``tokens`` more tokens (and, recording, each step's state)."""
        self.conv_state, self.state = conv_state, state
        self._offset += tokens
        if self._history is not None:
            self._history.extend(steps if steps else [(conv_state, state)])

    def is_trimmable(self) -> bool:
        return self._history is not None and len(self._history) > 1

    def trim(self, n: int) -> int:
        if self._history is None or n <= 0:
            return 0
        n = min(n, len(self._history) - 1)
        if n:
            del self._history[len(self._history) - n :]
            self.conv_state, self.state = self._history[-1]
            self._offset -= n
        return n

    def snapshot(self) -> Any:
        return (self.conv_state, self.state, self._offset)

    def restore(self, snapshot: Any) -> None:
        self.conv_state, self.state, self._offset = snapshot
        if self._history is not None:
            self._history = [(self.conv_state, self.state)]

    def export_state(self) -> LayerState:
        arrays = present(conv_state=self.conv_state, state=self.state)
        return LayerState(self.kind, arrays, {"offset": self._offset})

    def load_state(self, state: LayerState) -> None:
        check_kind(state, self.kind)
        self.restore((state.arrays.get("conv_state"), state.arrays.get("state"),
                      int(state.meta["offset"])))  # fmt: skip

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.conv_state, self.state) if a is not None)


class TracedGDNCache:
    """Stands in for a ``GDNCache`` while a pass is traced for ``mx.compile``.

    The layer reads and replaces the states as usual; ``written`` hands them out of the
    graph, with each token's state while ``recording`` (a fixed part of the trace), and
    ``GDNCache.update`` takes them in.
    """

    kind = "gdn"

    def __init__(
        self, conv_state: mx.array, state: mx.array, offset: mx.array, recording: bool
    ) -> None:
        self.conv_state: mx.array | None = conv_state
        self.state: mx.array | None = state
        self.offset = offset
        self.recording = recording
        self.steps: list[tuple[mx.array, mx.array]] = []

    def update(self, conv_state: mx.array, state: mx.array, tokens: int,
               steps: list[tuple[mx.array, mx.array]] | None = None) -> None:  # fmt: skip
        self.conv_state, self.state = conv_state, state
        if self.recording:
            self.steps = list(steps) if steps else [(conv_state, state)]

    def written(self) -> tuple[Any, ...]:
        assert self.conv_state is not None and self.state is not None
        return self.conv_state, self.state, self.steps
