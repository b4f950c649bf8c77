"""Gated activations of routed experts (the adapter's ``swiglu_variant``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class GateActivation:
    """``kind`` is ``swiglu``, ``geglu`` or ``clamped_swiglu``.

    ``clamped_swiglu`` is ``g * sigmoid(alpha * g) * (u + up_shift)`` with ``g = min(gate,
    limit)`` and ``u = clip(up, -limit, limit)``: ``alpha=1.702, up_shift=1`` is GPT-OSS's form,
    ``alpha=1, up_shift=0`` a plain SiLU gate with clamped inputs.
    """

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    up_shift: float = 1.0

    def function(self) -> Callable[[mx.array, mx.array], mx.array]:
        """``f(gate, up)`` for this variant."""
        if self.kind == "swiglu":
            return _swiglu
        if self.kind == "geglu":
            return _geglu
        if self.kind == "clamped_swiglu":
            alpha, limit, shift = self.alpha, self.limit, self.up_shift

            def clamped(gate: mx.array, up: mx.array) -> mx.array:
                gate = mx.minimum(gate, limit)
                up = mx.clip(up, -limit, limit)
                return gate * mx.sigmoid(alpha * gate) * (up + shift)

            return clamped
        raise ValueError(f"unknown gate activation {self.kind!r}")


@mx.compile
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    out: mx.array = nn.silu(gate) * up
    return out


@mx.compile
def _geglu(gate: mx.array, up: mx.array) -> mx.array:
    out: mx.array = nn.gelu_approx(gate) * up
    return out
