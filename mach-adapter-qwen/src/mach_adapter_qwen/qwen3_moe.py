"""Qwen3-MoE: GQA attention with q/k RMSNorm, softmax top-k router, SwiGLU experts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import LayerCache
from mach.config import AtLeast, ConfigReader, PositiveInt
from mach.experts.layouts import split_gate_up, stack_per_expert
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU
from mach.layers.attention import attend
from mach.layers.causal_lm import CausalLM, DecoderStack
from mach.layers.mlp import GatedMLP
from mach.layers.rope import make_rope
from mach.layers.routing import softmax_topk


@dataclass
class ModelArgs:
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    vocab_size: PositiveInt
    num_experts: Annotated[int, AtLeast(0)]
    num_experts_per_tok: PositiveInt
    moe_intermediate_size: PositiveInt
    intermediate_size: Annotated[int, AtLeast(0)] = 0
    head_dim: PositiveInt | None = None
    rms_norm_eps: float = 1e-6
    decoder_sparse_step: PositiveInt = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        read = ConfigReader(config)
        args = read.fields(cls, skip={"rope"}, aliases={"num_experts": "num_local_experts"})
        args.rope = {k: config[k] for k in ("rope_theta", "rope_parameters", "rope_scaling")
                     if k in config}  # fmt: skip
        if args.num_experts:
            read.at_most(args, "num_experts_per_tok", "num_experts")
        resolve_heads(read, args)
        return args

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


def resolve_heads(read: ConfigReader, args: Any) -> None:
    """Check the head counts and derive ``head_dim`` when the config leaves it out."""
    read.multiple_of(args, "num_attention_heads", "num_key_value_heads")
    if args.head_dim is None:
        why = "without head_dim, the head size is hidden_size / num_attention_heads"
        read.multiple_of(args, "hidden_size", "num_attention_heads", why)
        args.head_dim = args.hidden_size // args.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            hd,
        )
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = make_rope(hd, args.rope)

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.n_kv_heads, -1))
        k = k.transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        out = attend(q, k, v, cache, self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = UnboundSwitchGLU(
            SwitchSpec(
                args.num_experts,
                args.hidden_size,
                args.moe_intermediate_size,
                top_k=args.num_experts_per_tok,
            )
        )

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        y = self.switch_mlp(x, indices)
        return (y * weights[..., None]).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoeBlock(args)
            if args.is_sparse(layer)
            else GatedMLP(args.hidden_size, args.intermediate_size)
        )

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
        super().__init__(stack, args.tie_word_embeddings)
        self.args = args


_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.")
_PROJECTIONS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """HF per-expert, HF fused and mlx-community stacked names -> engine names."""
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    blocks = sorted({m.group(1) for k in weights if (m := _EXPERTS.match(k))})
    for block in blocks:
        fused = f"{block}.experts.gate_up_proj"
        if fused in weights:
            split_gate_up(weights, fused, f"{block}.switch_mlp")
            weights[f"{block}.switch_mlp.down_proj.weight"] = weights.pop(
                f"{block}.experts.down_proj"
            )
        else:
            stack_per_expert(weights, f"{block}.experts", f"{block}.switch_mlp", _PROJECTIONS)
    return weights
