"""The dense gated MLP families use beside or instead of experts: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


class GatedMLP(nn.Module):
    def __init__(
        self, dim: int, hidden: int, activation: Callable[[mx.array], mx.array] = nn.silu
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self._activation = activation

    def __call__(self, x: mx.array) -> mx.array:
        out: mx.array = self.down_proj(self._activation(self.gate_proj(x)) * self.up_proj(x))
        return out
