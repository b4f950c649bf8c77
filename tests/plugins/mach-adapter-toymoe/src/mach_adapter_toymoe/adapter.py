"""``toy_moe``: the adapter and its model, small enough to read in one sitting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mach import MoeArchAdapter
from mach.cache.base import LayerCache
from mach.config import ConfigReader, PositiveInt
from mach.experts.activations import GateActivation
from mach.experts.layouts import stack_per_expert
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU
from mach.layers.attention import attend
from mach.layers.routing import topk_softmax


@dataclass
class ToyArgs:
    dim: PositiveInt
    heads: PositiveInt
    layers: PositiveInt
    experts: PositiveInt
    top_k: PositiveInt
    expert_dim: PositiveInt
    vocab: PositiveInt
    rope_theta: float = 10000.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ToyArgs:
        read = ConfigReader(config)
        args = read.fields(cls)
        read.at_most(args, "top_k", "experts")
        read.multiple_of(args, "dim", "heads")
        return args


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, theta: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads, base=theta)

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        b, length, d = x.shape
        q, k, v = (
            t.reshape(b, length, self.heads, -1).transpose(0, 2, 1, 3)
            for t in mx.split(self.qkv(x), 3, axis=-1)
        )
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        out = attend(q, k, v, cache, (d // self.heads) ** -0.5)
        return self.out(out.transpose(0, 2, 1, 3).reshape(b, length, d))


class Moe(nn.Module):
    def __init__(self, dim: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        spec = SwitchSpec(experts, dim, hidden, GateActivation("geglu"), bias=True, top_k=top_k)
        self.switch = UnboundSwitchGLU(spec)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = topk_softmax(self.router(x), self.top_k)
        return (self.switch(x, indices) * weights[..., None]).sum(axis=-2)


class Layer(nn.Module):
    def __init__(self, args: ToyArgs) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim)
        self.attn = Attention(args.dim, args.heads, args.rope_theta)
        self.moe_norm = nn.RMSNorm(args.dim)
        self.moe = Moe(args.dim, args.expert_dim, args.experts, args.top_k)

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.moe(self.moe_norm(x))


class ToyMoe(nn.Module):
    def __init__(self, args: ToyArgs) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.dim)
        self.layers = [Layer(args) for _ in range(args.layers)]
        self.norm = nn.RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab, bias=False)

    def __call__(self, tokens: mx.array, cache: Sequence[LayerCache] | None = None) -> mx.array:
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return self.head(self.norm(h))


class ToyMoeAdapter(MoeArchAdapter):
    name = "toy_moe"
    model_types = ("toy_moe",)
    description = "A tiny test family published outside mach"
    swiglu_variant = "geglu"
    has_expert_bias = True

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        return ToyMoe(ToyArgs.from_config(config))

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        names = {"wi_gate": "gate_proj", "wi_up": "up_proj", "wo": "down_proj"}
        for layer in range(ToyArgs.from_config(config).layers):
            prefix = f"layers.{layer}.moe"
            stack_per_expert(weights, f"{prefix}.experts", f"{prefix}.switch", names)
        return weights
