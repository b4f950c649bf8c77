"""DeepSeek-V4 MoE: sqrt-softplus scores, learned or token-hashed expert choice, shared expert.

Learned layers pick the top-k of ``scores + e_score_correction_bias`` (the bias only steers the
choice); hash layers take the experts from a fixed ``tid2eid[token]`` table. Either way the
weights are the chosen raw scores, normalised to sum to one and scaled by
``routed_scaling_factor``. Experts and the shared expert are SwiGLU with clamped inputs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mach.experts.activations import GateActivation
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU
from mach_adapter_deepseek.config import ModelArgs


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if hashed:
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))
        self.hashed, self.top_k, self.scaling = (hashed, args.num_experts_per_tok,
                                                 args.routed_scaling_factor)  # fmt: skip

    def __call__(self, x: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        logits = (x @ self.weight.T.astype(x.dtype)).astype(mx.float32)
        scores = mx.sqrt(mx.logaddexp(logits, 0.0))
        if self.hashed:
            indices = self.tid2eid[tokens].astype(mx.int32)
        else:
            biased = scores + self.e_score_correction_bias.astype(mx.float32)
            indices = mx.argpartition(-biased, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        indices = mx.stop_gradient(indices)
        weights = mx.take_along_axis(scores, indices, axis=-1)
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20) * self.scaling
        return indices, weights.astype(x.dtype)


class SharedExpert(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: GateActivation) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self._activation = activation.function()

    def __call__(self, x: mx.array) -> mx.array:
        out: mx.array = self.down_proj(self._activation(self.gate_proj(x), self.up_proj(x)))
        return out


def expert_activation(args: ModelArgs) -> GateActivation:
    """SwiGLU with the gate capped and the up projection clipped at ``swiglu_limit``."""
    return GateActivation("clamped_swiglu", alpha=1.0, limit=args.swiglu_limit, up_shift=0.0)


class MoeBlock(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gate = Gate(args, hashed)
        # The loader binds the routed activation from the adapter (the same expert_activation).
        spec = SwitchSpec(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size,
                          top_k=args.num_experts_per_tok)  # fmt: skip
        self.switch_mlp = UnboundSwitchGLU(spec)
        self.shared_experts = SharedExpert(args.hidden_size, args.moe_intermediate_size,
                                           expert_activation(args))  # fmt: skip

    def __call__(self, x: mx.array, tokens: mx.array) -> mx.array:
        indices, weights = self.gate(x, tokens)
        routed = (self.switch_mlp(x, indices) * weights[..., None]).sum(axis=-2)
        return routed + self.shared_experts(x)
