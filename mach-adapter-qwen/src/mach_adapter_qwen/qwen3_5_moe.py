"""Qwen3.5-MoE: Gated DeltaNet layers with gated full attention every few layers, MoE with a
sigmoid-gated shared expert in every layer."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import LayerCache
from mach.cache.gdn import GDNCache
from mach.cache.kv import KVCache
from mach.config import ConfigReader, PositiveInt
from mach.experts.layouts import rename, split_gate_up, stack_per_expert
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU
from mach.layers.attention import attend
from mach.layers.causal_lm import CausalLM, DecoderStack
from mach.layers.gated_delta import chunked_gated_delta, recurrent_gated_delta
from mach.layers.mlp import GatedMLP
from mach.layers.routing import softmax_topk
from mach_adapter_qwen.qwen3_moe import resolve_heads

LayerType = Literal["linear_attention", "full_attention"]


@dataclass
class ModelArgs:
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    vocab_size: PositiveInt
    num_experts: PositiveInt
    num_experts_per_tok: PositiveInt
    moe_intermediate_size: PositiveInt
    shared_expert_intermediate_size: PositiveInt
    linear_num_key_heads: PositiveInt
    linear_num_value_heads: PositiveInt
    linear_key_head_dim: PositiveInt
    linear_value_head_dim: PositiveInt
    linear_conv_kernel_dim: PositiveInt = 4
    head_dim: PositiveInt | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    full_attention_interval: PositiveInt = 4
    layer_types: list[LayerType] = field(default_factory=list)
    rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        read = ConfigReader(config, section="text_config")
        args = read.fields(cls, skip={"rope"})
        text = config.get("text_config")
        merged = {**config, **text} if isinstance(text, Mapping) else dict(config)
        rope = merged.get("rope_parameters") or {}
        theta = rope.get("rope_theta", merged.get("rope_theta", 10000.0))
        args.rope = {
            "rope_theta": theta,
            "partial_rotary_factor": rope.get(
                "partial_rotary_factor", merged.get("partial_rotary_factor", 0.25)
            ),
        }
        read.at_most(args, "num_experts_per_tok", "num_experts")
        read.multiple_of(args, "linear_num_value_heads", "linear_num_key_heads")
        resolve_heads(read, args)
        if args.layer_types:
            read.per_layer(args, "layer_types")
        else:
            args.layer_types = [
                "full_attention" if (i + 1) % args.full_attention_interval == 0
                else "linear_attention"
                for i in range(args.num_hidden_layers)
            ]  # fmt: skip
        return args


class GatedAttention(nn.Module):
    """Full attention whose output is gated per head by a second half of the query projection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        self.n_heads, self.n_kv, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)  # fmt: skip
        self.scale = self.head_dim**-0.5
        d, hd, bias = args.hidden_size, self.head_dim, args.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd * 2, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        rotary = int(hd * args.rope["partial_rotary_factor"])
        self.rope = nn.RoPE(rotary, traditional=False, base=args.rope["rope_theta"])

    def __call__(self, x: mx.array, cache: LayerCache | None) -> mx.array:
        b, length, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(b, length, self.n_heads, -1), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.n_kv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        out = attend(q, k, v, cache, self.scale).transpose(0, 2, 1, 3).reshape(b, length, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(b, length, -1)))


class GatedRMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        return (normed * nn.silu(gate.astype(mx.float32))).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hk, self.hv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.kernel = args.linear_conv_kernel_dim
        key_dim, value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        d = args.hidden_size
        self.in_proj_qkv = nn.Linear(d, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(d, value_dim, bias=False)
        self.in_proj_b = nn.Linear(d, self.hv, bias=False)
        self.in_proj_a = nn.Linear(d, self.hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=False)  # fmt: skip
        self.dt_bias = mx.ones((self.hv,))
        self.A_log = mx.zeros((self.hv,))
        self.norm = GatedRMSNorm(self.dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, d, bias=False)

    def __call__(self, x: mx.array, cache: GDNCache | None) -> mx.array:
        b, length, _ = x.shape
        qkv = self.in_proj_qkv(x)
        if cache is not None and cache.conv_state is not None:
            window = cache.conv_state
        else:
            window = mx.zeros((b, self.kernel - 1, self.conv_dim), qkv.dtype)
        padded = mx.concatenate([window, qkv], axis=1)
        conv_state = padded[:, -(self.kernel - 1) :]
        mixed = nn.silu(self.conv1d(padded))
        q, k, v = mx.split(mixed, [self.hk * self.dk, 2 * self.hk * self.dk], axis=-1)
        q = q.reshape(b, length, self.hk, self.dk)
        k = k.reshape(b, length, self.hk, self.dk)
        v = v.reshape(b, length, self.hv, self.dv)
        if self.hv != self.hk:
            q = mx.repeat(q, self.hv // self.hk, axis=2)
            k = mx.repeat(k, self.hv // self.hk, axis=2)
        beta = mx.sigmoid(self.in_proj_b(x).astype(mx.float32))
        a = self.in_proj_a(x).astype(mx.float32) + self.dt_bias.astype(mx.float32)
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a)
        state = cache.state if cache is not None and cache.state is not None else mx.zeros(
            (b, self.hv, self.dk, self.dv), mx.float32)  # fmt: skip
        steps = None
        if cache is not None and cache.recording:
            out, state, states = recurrent_gated_delta(q, k, v, g, beta, state, record=True)
            convs = [padded[:, t + 1 : t + self.kernel] for t in range(length)]
            steps = list(zip(convs, states, strict=True))
        elif length == 1:
            out, state, _ = recurrent_gated_delta(q, k, v, g, beta, state)
        else:
            out, state = chunked_gated_delta(q, k, v, g, beta, state)
        if cache is not None:
            cache.update(conv_state, state, length, steps)
        z = self.in_proj_z(x).reshape(b, length, self.hv, self.dv)
        out = self.norm(out.astype(x.dtype), z)
        return self.out_proj(out.reshape(b, length, -1))


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        d = args.hidden_size
        self.gate = nn.Linear(d, args.num_experts, bias=False)
        self.switch_mlp = UnboundSwitchGLU(
            SwitchSpec(args.num_experts, d, args.moe_intermediate_size, top_k=self.top_k)
        )
        self.shared_expert = GatedMLP(d, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = softmax_topk(self.gate(x), self.top_k, normalize=True)
        routed = (self.switch_mlp(x, indices) * weights[..., None]).sum(axis=-2)
        return routed + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.is_linear = args.layer_types[layer] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = SparseMoeBlock(args)

    def __call__(self, x: mx.array, cache: Any) -> mx.array:
        normed = self.input_layernorm(x)
        mixer = self.linear_attn(normed, cache) if self.is_linear else self.self_attn(normed, cache)
        h = x + mixer
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        stack = DecoderStack(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps)
        super().__init__(stack, args.tie_word_embeddings)
        self.args = args

    def make_cache(self) -> list[LayerCache]:
        return [GDNCache() if layer.is_linear else KVCache() for layer in self.layers]


_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))  # fmt: skip
_DROPPED = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.", "mtp.",
            "language_model.mtp.")  # fmt: skip
_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.")
_ZERO_CENTRED = re.compile(
    r"(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$|^model\.norm\.weight$"
)
_PROJECTIONS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def _is_raw_hf(weights: dict[str, mx.array]) -> bool:
    """Whether norms are stored zero-centred and conv1d in torch's layout (transformers) rather
    than as mlx-lm and mach write them. The conv1d layout says so; a model without
    linear-attention layers has none, and then the expert names do: only transformers keeps
    routed experts under ``experts`` (mlx-lm renames them to ``switch_mlp``, mach's engine format
    moves them out of the safetensors into its sidecar).
    """
    convs = [v for k, v in weights.items() if k.endswith("conv1d.weight")]
    if convs:
        return any(v.shape[-1] != 1 for v in convs)
    return any(_EXPERTS.match(k) for k in weights)


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """HF (CausalLM or the multimodal wrapper; fused or per-expert) and mlx-community names ->
    engine names. Raw HF checkpoints store zero-centred norms and torch's conv1d layout."""
    out = rename(weights, _PREFIXES, _DROPPED)
    if args.tie_word_embeddings:
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    raw_hf = _is_raw_hf(out)
    if raw_hf:
        for name in list(out):
            if name.endswith("conv1d.weight"):
                out[name] = out[name].moveaxis(2, 1)
            elif _ZERO_CENTRED.search(name):
                out[name] = out[name] + 1.0
    for block in sorted({m.group(1) for k in out if (m := _EXPERTS.match(k))}):
        fused = f"{block}.experts.gate_up_proj"
        if fused in out:
            split_gate_up(out, fused, f"{block}.switch_mlp")
            out[f"{block}.switch_mlp.down_proj.weight"] = out.pop(f"{block}.experts.down_proj")
        else:
            stack_per_expert(out, f"{block}.experts", f"{block}.switch_mlp", _PROJECTIONS)
    return out
