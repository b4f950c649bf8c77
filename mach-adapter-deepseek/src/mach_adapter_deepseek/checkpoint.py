"""DeepSeek-V4 tensor names and packed formats -> engine names and arrays (all lazy).

Three namings arrive here: the release's own (``layers.N.attn.wq_a``, ``ffn.experts.E.w1``,
``embed``, ``head``, ``hc_head_fn``), the same under ``model.`` as transformers saves it by
default, and transformers' in-memory names (``self_attn.q_a_proj``, fused
``mlp.experts.gate_up_proj``). Engine names are the last, with routed experts at
``mlp.switch_mlp.{gate,up,down}_proj``.

The release packs matrices as FP8 e4m3 with one scale per 128x128 block (dequantized here:
MLX has no block-scaled FP8 matmul) and routed experts as FP4 E2M1 codes, two per byte, with
one E8M0 scale per 32 inputs. That is bit for bit MLX's ``mxfp4`` format, so the experts are
only re-viewed, never dequantized.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from mach.errors import CheckpointError
from mach.experts.layouts import split_gate_up, stack_per_expert

_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale",
        "model.embed_tokens.weight": "model.embed_tokens.weight"}  # fmt: skip

# Inside a block: release name -> engine name (first match wins, so longer names come first).
_BLOCK = (
    ("attn.indexer.compressor.wkv.", "self_attn.compressor.indexer.compressor.kv_proj."),
    ("attn.indexer.compressor.wgate.", "self_attn.compressor.indexer.compressor.gate_proj."),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.compressor.position_bias"),
    ("attn.indexer.compressor.norm.", "self_attn.compressor.indexer.compressor.kv_norm."),
    ("attn.indexer.wq_b.", "self_attn.compressor.indexer.q_b_proj."),
    ("attn.indexer.weights_proj.", "self_attn.compressor.indexer.weights_proj."),
    ("attn.compressor.wkv.", "self_attn.compressor.kv_proj."),
    ("attn.compressor.wgate.", "self_attn.compressor.gate_proj."),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.", "self_attn.compressor.kv_norm."),
    ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_norm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv.", "self_attn.kv_proj."),
    ("attn.norm.", "self_attn.kv_norm."),
    ("attn.wo_a.", "self_attn.o_a_proj."),
    ("attn.wo_b.", "self_attn.o_b_proj."),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("hc_attn_", "attn_hc."),
    ("hc_ffn_", "ffn_hc."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.", "mlp.gate."),
    ("ffn.shared_experts.w1.", "mlp.shared_experts.gate_proj."),
    ("ffn.shared_experts.w2.", "mlp.shared_experts.down_proj."),
    ("ffn.shared_experts.w3.", "mlp.shared_experts.up_proj."),
    ("ffn.experts.", "mlp.experts."),
    # transformers' in-memory names that differ from the engine's
    ("self_attn.compressor.indexer.scorer.weights_proj.",
     "self_attn.compressor.indexer.weights_proj."),
    ("self_attn.compressor.indexer.kv_proj.", "self_attn.compressor.indexer.compressor.kv_proj."),
    ("self_attn.compressor.indexer.gate_proj.",
     "self_attn.compressor.indexer.compressor.gate_proj."),
    ("self_attn.compressor.indexer.position_bias",
     "self_attn.compressor.indexer.compressor.position_bias"),
    ("self_attn.compressor.indexer.kv_norm.", "self_attn.compressor.indexer.compressor.kv_norm."),
)  # fmt: skip
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EXPERT_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
                       "gate_proj": "gate_proj", "down_proj": "down_proj",
                       "up_proj": "up_proj"}  # fmt: skip


def engine_name(name: str, prefix: str = "model.layers.") -> str | None:
    """The engine name of one tensor, ``None`` for tensors the model does not use."""
    if name.startswith("mtp.") or "rotary_emb" in name:
        return None
    bare = name.removeprefix("model.")
    if name in _TOP or bare in _TOP:
        return _TOP.get(name) or _TOP[bare]
    if bare.startswith(("norm.", "hc_head.")) or name == "lm_head.weight":
        return name
    match = _LAYER.match(name)
    if match is None:
        return name
    layer, rest = match.groups()
    for old, new in _BLOCK:
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return f"{prefix}{layer}.{rest}"


def _e8m0(scale: mx.array) -> mx.array:
    if scale.dtype == mx.uint8:
        return mx.power(2.0, scale.astype(mx.float32) - 127.0)
    return scale.astype(mx.float32)


def dequantize_fp8(weight: mx.array, scale: mx.array, block: tuple[int, int],
                   dtype: mx.Dtype) -> mx.array:  # fmt: skip
    """FP8 e4m3 codes ``[out, in]`` times one scale per ``block`` -> ``dtype``."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block[0]), -(-in_dim // block[1])
    if tuple(scale.shape) != (rows, cols):
        raise CheckpointError(
            f"FP8 weight {list(weight.shape)} needs block scales [{rows}, {cols}] for "
            f"{block[0]}x{block[1]} blocks, found {list(scale.shape)}"
        )
    values = mx.from_fp8(weight, dtype=mx.float32)
    full = mx.repeat(mx.repeat(_e8m0(scale), block[0], axis=0), block[1], axis=1)
    return (values * full[:out_dim, :in_dim]).astype(dtype)


def _fp4_as_mxfp4(weight: mx.array, scale: mx.array, name: str) -> tuple[mx.array, mx.array]:
    """Two E2M1 codes per int8 (low nibble first) + E8M0 per 32 -> MLX ``mxfp4`` arrays."""
    if weight.shape[-1] * 2 != scale.shape[-1] * 32:
        raise CheckpointError(
            f"{name}: FP4 weight {list(weight.shape)} (two codes per byte) needs one scale per 32 "
            f"inputs, found scales {list(scale.shape)}"
        )
    if scale.dtype != mx.uint8:
        raise CheckpointError(f"{name}: FP4 scales must be E8M0 (uint8), found {scale.dtype}")
    return weight.view(mx.uint8).view(mx.uint32), scale


def unpack(weights: dict[str, mx.array], config: Mapping[str, Any]) -> dict[str, mx.array]:
    """Packed ``X.weight`` + ``X.scale`` pairs -> float weights or ``mxfp4`` weight/scales."""
    qc = config.get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size") or (128, 128))
    embeds = ("embed.weight", "embed_tokens.weight")
    floats = [v.dtype for k, v in weights.items() if k.endswith(embeds)]
    dtype = floats[0] if floats and mx.issubdtype(floats[0], mx.floating) else mx.bfloat16
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith(".scale") and f"{name.removesuffix('.scale')}.weight" in weights:
            continue
        stem = name.removesuffix(".weight")
        scale = weights.get(f"{stem}.scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = value
        elif value.dtype == mx.int8:
            out[name], out[f"{stem}.scales"] = _fp4_as_mxfp4(value, scale, name)
        elif value.dtype == mx.uint8:
            out[name] = dequantize_fp8(value, scale, (int(block[0]), int(block[1])), dtype)
        else:
            out[name] = value * _e8m0(scale).astype(value.dtype)
    return out


def stack_experts(weights: dict[str, mx.array]) -> None:
    """Per-expert (``experts.E.w1``) or fused (``experts.gate_up_proj``) -> ``switch_mlp``."""
    blocks = {m.group(1) for k in weights if (m := re.match(r"^(.*\.mlp)\.experts\.", k))}
    for block in sorted(blocks):
        source, target = f"{block}.experts", f"{block}.switch_mlp"
        if f"{source}.gate_up_proj" in weights:
            weights[f"{source}.gate_up_proj.weight"] = weights.pop(f"{source}.gate_up_proj")
            split_gate_up(weights, f"{source}.gate_up_proj.weight", target, axis=-2)
            weights[f"{target}.down_proj.weight"] = weights.pop(f"{source}.down_proj")
        else:
            stack_per_expert(weights, source, target, _EXPERT_PROJECTIONS)
    for name in [k for k in weights if k.endswith(".tid2eid")]:
        weights[name] = weights[name].astype(mx.int32)


def sanitize(weights: dict[str, mx.array], config: Mapping[str, Any]) -> dict[str, mx.array]:
    """Every supported naming and packing -> engine names."""
    out: dict[str, mx.array] = {}
    for name, value in unpack(weights, config).items():
        target = engine_name(name)
        if target is not None:
            out[target] = value
    if config.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)
    stack_experts(out)
    return out
