"""Gemma 4 MoE: a dense GeGLU MLP beside the routed experts in every layer, sliding-window and
full attention (proportional RoPE, shared keys and values), scaled embeddings, softcapped logits."""

from __future__ import annotations

import math
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
from mach.errors import ConfigError
from mach.experts.layouts import rename, split_gate_up
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU
from mach.layers.attention import attend
from mach.layers.causal_lm import CausalLM, DecoderStack
from mach.layers.mlp import GatedMLP


@dataclass
class LayerShape:
    """One layer's attention shape in ``per_layer_config``, where it differs from the rest."""

    head_dim: PositiveInt | None = None
    num_key_value_heads: PositiveInt | None = None


@dataclass
class ModelArgs:
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    vocab_size: PositiveInt
    intermediate_size: PositiveInt
    num_experts: PositiveInt
    top_k_experts: PositiveInt
    moe_intermediate_size: PositiveInt
    head_dim: PositiveInt = 256
    global_head_dim: PositiveInt | None = None
    num_global_key_value_heads: PositiveInt | None = None
    attention_k_eq_v: bool = False
    sliding_window: PositiveInt = 1024
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    layer_types: list[Literal["sliding_attention", "full_attention"]] = field(default_factory=list)
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    per_layer_config: dict[str, LayerShape] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        read = ConfigReader(config, section="text_config")
        args = read.fields(cls)
        read.at_most(args, "top_k_experts", "num_experts")
        read.multiple_of(args, "num_attention_heads", "num_key_value_heads")
        if args.num_global_key_value_heads is not None:
            read.multiple_of(args, "num_attention_heads", "num_global_key_value_heads")
        for layer, shape in args.per_layer_config.items():
            kv = shape.num_key_value_heads
            if kv and args.num_attention_heads % kv:
                where = f"{read.path('per_layer_config')}.{layer}.num_key_value_heads"
                raise ConfigError(
                    f"{read.path('num_attention_heads')} ({args.num_attention_heads}) is not a "
                    f"multiple of {where} ({kv})"
                )
        if args.layer_types:
            read.per_layer(args, "layer_types")
        else:
            args.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                for i in range(args.num_hidden_layers)]  # fmt: skip
        return args

    def attention_shape(self, layer: int) -> tuple[int, int]:
        """``(head_dim, kv_heads)`` of a layer."""
        override = self.per_layer_config.get(str(layer))
        if override is not None and (override.head_dim or override.num_key_value_heads):
            return (override.head_dim or self.head_dim,
                    override.num_key_value_heads or self.num_key_value_heads)  # fmt: skip
        if self.layer_types[layer] == "full_attention" and self.global_head_dim:
            kv = self.num_global_key_value_heads if self.attention_k_eq_v else None
            return self.global_head_dim, kv or self.num_key_value_heads
        return self.head_dim, self.num_key_value_heads


class GemmaRoPE(nn.Module):
    """Default RoPE, or proportional RoPE: the first fraction of frequencies over the whole head,
    the rest left unrotated."""

    def __init__(self, head_dim: int, params: Mapping[str, Any]) -> None:
        super().__init__()
        theta = float(params.get("rope_theta", 10000.0))
        share = float(params.get("partial_rotary_factor", 1.0))
        if params.get("rope_type", "default") == "proportional":
            rotated = int(share * head_dim // 2)
        else:
            rotated = head_dim // 2
        periods = theta ** (mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim)
        frozen = mx.full((head_dim // 2 - rotated,), mx.inf)
        self._freqs = mx.concatenate([periods, frozen])
        self.head_dim = head_dim

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)  # fmt: skip


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        kind = args.layer_types[layer]
        self.window = args.sliding_window if kind == "sliding_attention" else None
        self.head_dim, self.n_kv = args.attention_shape(layer)
        self.n_heads = args.num_attention_heads
        shares_kv = args.attention_k_eq_v and kind == "full_attention"
        d, hd, eps = args.hidden_size, self.head_dim, args.rms_norm_eps
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        if not shares_kv:
            self.v_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=eps)
        self.k_norm = nn.RMSNorm(hd, eps=eps)
        self.eps = eps
        self.shares_kv = shares_kv
        self.rope = GemmaRoPE(hd, args.rope_parameters.get(kind, {}))

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, self.n_heads, -1))
        k = self.k_proj(x).reshape(b, length, self.n_kv, -1)
        v = k if self.shares_kv else self.v_proj(x).reshape(b, length, self.n_kv, -1)
        k = self.k_norm(k)
        v = mx.fast.rms_norm(v, None, self.eps)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(k.transpose(0, 2, 1, 3), offset=offset)
        out = attend(q, k, v.transpose(0, 2, 1, 3), cache, 1.0, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class Router(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.eps = args.top_k_experts, args.rms_norm_eps
        self.root = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        z = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root
        probs = mx.softmax(self.proj(z), axis=-1, precise=True)
        indices = mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :]
        weights = mx.take_along_axis(probs, indices, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights * self.per_expert_scale[indices]


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.sliding = args.layer_types[layer] == "sliding_attention"
        self.self_attn = Attention(args, layer)
        self.mlp = GatedMLP(d, args.intermediate_size, nn.gelu_approx)
        self.router = Router(args)
        self.experts = UnboundSwitchGLU(SwitchSpec(args.num_experts, d, args.moe_intermediate_size,
                                                   top_k=args.top_k_experts))  # fmt: skip
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):  # fmt: skip
            setattr(self, name, nn.RMSNorm(d, eps=eps))
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        indices, weights = self.router(h)
        routed = self.experts(self.pre_feedforward_layernorm_2(h), indices)
        routed = self.post_feedforward_layernorm_2((routed * weights[..., None]).sum(axis=-2))
        return (h + self.post_feedforward_layernorm(dense + routed)) * self.layer_scalar


class ScaledStack(DecoderStack):
    def embed(self, tokens: mx.array) -> mx.array:
        h = self.embed_tokens(tokens)
        return h * mx.array(math.sqrt(h.shape[-1]), dtype=h.dtype)


class Model(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        stack = ScaledStack(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
        super().__init__(stack, args.tie_word_embeddings)
        self.args = args

    def head(self, h: mx.array) -> mx.array:
        logits = super().head(h)
        cap = self.args.final_logit_softcapping
        return mx.tanh(logits / cap) * cap if cap else logits

    def make_cache(self) -> list[LayerCache]:
        return [RotatingKVCache(self.args.sliding_window) if layer.sliding else KVCache()
                for layer in self.layers]  # fmt: skip


_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))  # fmt: skip
_DROPPED = (
    "model.vision_tower.",
    "model.embed_vision.",
    "model.audio_tower.",
    "model.embed_audio.",
    "vision_tower.",
    "audio_tower.",
    "embed_vision.",
    "embed_audio.",
)
_EXPERTS = re.compile(r"^(model\.layers\.\d+\.experts)\.")


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """HF (CausalLM or the multimodal wrapper) and mlx-community names -> engine names."""
    out = {k.replace(".experts.switch_glu.", ".experts."): v
           for k, v in rename(weights, _PREFIXES, _DROPPED).items()}  # fmt: skip
    if args.tie_word_embeddings:
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    for block in sorted({m.group(1) for k in out if (m := _EXPERTS.match(k))}):
        fused = f"{block}.gate_up_proj"
        if fused in out:
            split_gate_up(out, fused, block)
            out[f"{block}.down_proj.weight"] = out.pop(f"{block}.down_proj")
    return out
