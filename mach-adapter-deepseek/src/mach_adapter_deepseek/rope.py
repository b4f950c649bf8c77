"""DeepSeek-V4's rotary tables: interleaved pairs on the trailing ``rope_dims`` of a head.

Compressed entries sit at strided positions (``i * ratio``), so angles are computed from an
explicit position array rather than an offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from mach.layers.rope import YarnRoPE


class RotaryTable:
    """One table (``main`` or ``compress``): rotations for any positions."""

    def __init__(self, rope_dims: int, theta: float, scaling: Mapping[str, Any] | None) -> None:
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "yarn":
            scaling = {**dict(scaling or {}), "attention_factor": 1.0}
            freqs = YarnRoPE(rope_dims, theta, scaling, traditional=True)._freqs
            self.inv_freq = 1.0 / freqs
        else:
            self.inv_freq = 1.0 / theta ** (
                mx.arange(0, rope_dims, 2, dtype=mx.float32) / rope_dims
            )
        self.rope_dims = rope_dims
        # Evaluated now: a lazy table would be computed by whichever thread first decodes.
        mx.eval(self.inv_freq)

    def at(self, positions: mx.array) -> Rotation:
        """The rotation for these positions, to apply to several tensors."""
        angles = positions.astype(mx.float32)[:, None] * self.inv_freq[None, :]
        return Rotation(mx.cos(angles), mx.sin(angles), self.rope_dims)

    def apply(self, x: mx.array, positions: mx.array) -> mx.array:
        """Rotate the trailing ``rope_dims`` of ``x`` (positions index axis -2)."""
        return self.at(positions).apply(x)


class Rotation:
    """Cosines and sines ``[L, rope_dims / 2]`` of one set of positions."""

    def __init__(self, cos: mx.array, sin: mx.array, rope_dims: int) -> None:
        self.cos, self.sin, self.rope_dims = cos, sin, rope_dims

    def apply(self, x: mx.array, inverse: bool = False) -> mx.array:
        """Rotate the trailing ``rope_dims`` of ``x`` [..., L, D]; ``inverse`` turns it back."""
        cos, sin = self.cos, -self.sin if inverse else self.sin
        rd = self.rope_dims
        nope, rope = x[..., :-rd], x[..., -rd:]
        pairs = rope.astype(mx.float32).reshape(*rope.shape[:-1], rd // 2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = mx.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
        return mx.concatenate([nope, rotated.reshape(rope.shape).astype(x.dtype)], axis=-1)
