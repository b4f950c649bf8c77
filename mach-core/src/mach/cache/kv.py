"""``KVCache``: keys and values of full attention, grown in preallocated steps."""

from __future__ import annotations

import mlx.core as mx

from mach.cache.positions import AppendOnlyPositions
from mach.cache.snapshot import LayerState, check_kind, present


class KVCache(AppendOnlyPositions):
    """Keys/values ``[batch, kv_heads, positions, head_dim]`` for one attention layer."""

    label = "KV cache"
    kind = "kv"

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self._offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append new positions and return all keys and values held so far."""
        prev = self._offset
        new = keys.shape[2]
        self._reserve(new, keys, values)
        assert self.keys is not None and self.values is not None
        self._offset = prev + new
        self.keys[..., prev : self._offset, :] = keys
        self.values[..., prev : self._offset, :] = values
        return self.keys[..., : self._offset, :], self.values[..., : self._offset, :]

    def _reserve(self, new: int, keys: mx.array, values: mx.array) -> None:
        """Grow the buffers (like ``keys`` / ``values``) so ``new`` more positions fit."""
        prev = self._offset
        if self.keys is not None and self.values is not None and prev + new <= self.keys.shape[2]:
            return
        grow = ((new + self.step - 1) // self.step) * self.step
        b, h, _, dk = keys.shape
        k_more = mx.zeros((b, h, grow, dk), keys.dtype)
        v_more = mx.zeros((b, h, grow, values.shape[3]), values.dtype)
        if self.keys is None or self.values is None:
            self.keys, self.values = k_more, v_more
        else:
            self.keys = mx.concatenate([self.keys[..., :prev, :], k_more], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], v_more], axis=2)

    def reserve(self, new: int) -> tuple[mx.array, mx.array]:
        """The buffers, grown so ``new`` more positions fit (the cache must hold some)."""
        if self.keys is None or self.values is None:
            raise ValueError("an empty KV cache has no buffers to reserve in")
        self._reserve(new, self.keys, self.values)
        return self.keys, self.values

    def commit(self, keys: mx.array, values: mx.array, new: int) -> None:
        """Adopt buffers a compiled pass wrote ``new`` positions into, after the offset."""
        assert self.keys is not None and keys.shape == self.keys.shape
        self.keys, self.values = keys, values
        self._offset += new

    def export_state(self) -> LayerState:
        held = self.state
        keys, values = held if held is not None else (None, None)
        return LayerState(self.kind, present(keys=keys, values=values), {"offset": self._offset})

    def load_state(self, state: LayerState) -> None:
        check_kind(state, self.kind)
        self.keys = self.values = None
        self._offset = 0
        if state.meta["offset"]:
            # Copied into a fresh buffer, so later writes never reach the stored snapshot.
            self.update_and_fetch(state.arrays["keys"], state.arrays["values"])
        if self._offset != state.meta["offset"]:
            raise ValueError(f"KV state holds {self._offset} positions, not {state.meta['offset']}")

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        if self.keys is None or self.values is None:
            return None
        return self.keys[..., : self._offset, :], self.values[..., : self._offset, :]

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes
