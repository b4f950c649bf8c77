"""GPT-OSS: attention with sinks and biases, alternating sliding-window and full layers, YaRN
RoPE; a biased router (top-k of logits, softmax over the k) and clamped SwiGLU experts with
biases, shipped as MXFP4."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import LayerCache
from mach.cache.kv import KVCache
from mach.cache.rotating import RotatingKVCache
from mach.config import ConfigReader, PositiveInt
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU
from mach.layers.attention import attend
from mach.layers.causal_lm import CausalLM, DecoderStack
from mach.layers.rope import make_rope
from mach.layers.routing import topk_softmax


@dataclass
class ModelArgs:
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    vocab_size: PositiveInt
    intermediate_size: PositiveInt
    num_local_experts: PositiveInt
    num_experts_per_tok: PositiveInt
    head_dim: PositiveInt = 64
    sliding_window: PositiveInt = 128
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    layer_types: list[Literal["sliding_attention", "full_attention"]] = field(default_factory=list)
    rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        read = ConfigReader(config)
        args = read.fields(cls, skip={"rope"}, aliases={"num_local_experts": "num_experts"})
        args.rope = {k: config[k] for k in ("rope_theta", "rope_parameters", "rope_scaling")
                     if k in config}  # fmt: skip
        read.at_most(args, "num_experts_per_tok", "num_local_experts")
        read.multiple_of(args, "num_attention_heads", "num_key_value_heads")
        if args.layer_types:
            read.per_layer(args, "layer_types")
        else:
            args.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(args.num_hidden_layers)]  # fmt: skip
        return args


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, sliding: bool) -> None:
        super().__init__()
        d, hd, bias = args.hidden_size, args.head_dim, args.attention_bias
        self.n_heads, self.n_kv, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.sinks = mx.zeros((self.n_heads,))
        self.window = args.sliding_window if sliding else None
        self.rope = make_rope(hd, args.rope)

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, length, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.n_kv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        out = attend(q, k, v, cache, self.head_dim**-0.5, sinks=self.sinks.astype(q.dtype),
                     window=self.window)  # fmt: skip
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class MoeBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_local_experts, bias=True)
        # The loader binds the adapter's activation (gate_activation) and expert bias.
        spec = SwitchSpec(args.num_local_experts, args.hidden_size, args.intermediate_size,
                          top_k=self.top_k)  # fmt: skip
        self.experts = UnboundSwitchGLU(spec)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = topk_softmax(self.router(x), self.top_k)
        return (self.experts(x, indices) * weights[..., None]).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.sliding = args.layer_types[layer] == "sliding_attention"
        self.self_attn = Attention(args, self.sliding)
        self.mlp = MoeBlock(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
        super().__init__(stack, args.tie_word_embeddings)
        self.args = args

    def make_cache(self) -> list[LayerCache]:
        return [RotatingKVCache(self.args.sliding_window) if layer.sliding else KVCache()
                for layer in self.layers]  # fmt: skip


_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.")


def _blocks_to_weight(blocks: mx.array) -> mx.array:
    """Official MXFP4 ``[E, out, in/32, 16]`` uint8 -> packed ``[E, out, in/8]`` uint32."""
    flat = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
    return flat.view(mx.uint32)


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Official MXFP4, HF float re-uploads (experts ``[E, in, out]``, gate/up interleaved) and
    mlx-community (already split, ``experts.*_proj``) -> engine names."""
    out = {k: v for k, v in weights.items() if "rotary_emb" not in k}
    if args.tie_word_embeddings:
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    for block in sorted({m.group(1) for k in out if (m := _EXPERTS.match(k))}):
        if f"{block}.gate_up_proj_blocks" in out:
            fused = _blocks_to_weight(out.pop(f"{block}.gate_up_proj_blocks"))
            scales = out.pop(f"{block}.gate_up_proj_scales")
            out[f"{block}.gate_proj.weight"], out[f"{block}.up_proj.weight"] = (
                fused[:, ::2], fused[:, 1::2])  # fmt: skip
            out[f"{block}.gate_proj.scales"], out[f"{block}.up_proj.scales"] = (
                scales[:, ::2], scales[:, 1::2])  # fmt: skip
            out[f"{block}.down_proj.weight"] = _blocks_to_weight(
                out.pop(f"{block}.down_proj_blocks")
            )
            out[f"{block}.down_proj.scales"] = out.pop(f"{block}.down_proj_scales")
        elif f"{block}.gate_up_proj" in out:
            fused = out.pop(f"{block}.gate_up_proj")
            out[f"{block}.gate_proj.weight"] = fused[..., ::2].swapaxes(1, 2)
            out[f"{block}.up_proj.weight"] = fused[..., 1::2].swapaxes(1, 2)
            out[f"{block}.down_proj.weight"] = out.pop(f"{block}.down_proj").swapaxes(1, 2)
        if f"{block}.gate_up_proj_bias" in out:
            bias = out.pop(f"{block}.gate_up_proj_bias")
            out[f"{block}.gate_proj.bias"], out[f"{block}.up_proj.bias"] = (
                bias[:, ::2],
                bias[:, 1::2],
            )
        if f"{block}.down_proj_bias" in out:
            out[f"{block}.down_proj.bias"] = out.pop(f"{block}.down_proj_bias")
    return out
