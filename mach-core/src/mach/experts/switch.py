"""``UnboundSwitchGLU``: where a family's model puts its routed experts before loading."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mach.errors import AdapterError
from mach.experts.activations import GateActivation


@dataclass(frozen=True)
class SwitchSpec:
    """Shape and activation of one layer's routed experts."""

    num_experts: int
    input_dims: int
    hidden_dims: int
    activation: GateActivation | None = None
    """The gated activation; ``None`` until the loader binds the adapter's ``swiglu_variant``."""
    bias: bool | None = None
    """Whether experts carry a bias; ``None`` until the loader binds ``has_expert_bias``."""
    top_k: int = 1
    """Experts each token is routed to (the least a streaming bank must hold per layer)."""


class UnboundSwitchGLU(nn.Module):
    """A routed-expert block that owns no weights; the loader swaps it for a dispatch module.

    Family code builds its MoE blocks with this, so that expert weights are never materialised
    by the model itself: they belong to the expert store chosen at load time.
    """

    def __init__(self, spec: SwitchSpec) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.spec = spec

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        raise AdapterError(
            "routed experts are not bound to a store; load the model through mach.load_moe"
        )
