"""qwen3_moe checkpoints with random weights, made deterministically from a seed.

Benchmarks and tests size them as they need; their text is noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
}


def _byte_alphabet() -> list[str]:
    # The printable stand-ins byte-level BPE uses for the 256 byte values.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    printable += list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tokenizer_json() -> dict[str, Any]:
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    added = [
        {"id": 256 + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(SPECIALS)
    ]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": True}  # fmt: skip
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "dropout": None,
                  "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False},
    }  # fmt: skip


def _weights(config: dict[str, Any], vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    d, hd = config["hidden_size"], config["head_dim"]
    h, kv = config["num_attention_heads"], config["num_key_value_heads"]
    e, i_moe = config["num_experts"], config["moe_intermediate_size"]

    def mat(*shape: int) -> np.ndarray:
        out: np.ndarray = (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
        return out

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, d), "model.norm.weight": norm(d),
         "lm_head.weight": mat(vocab, d)}  # fmt: skip
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        w[f"{p}.input_layernorm.weight"] = norm(d)
        w[f"{p}.post_attention_layernorm.weight"] = norm(d)
        w[f"{p}.self_attn.q_proj.weight"] = mat(h * hd, d)
        w[f"{p}.self_attn.k_proj.weight"] = mat(kv * hd, d)
        w[f"{p}.self_attn.v_proj.weight"] = mat(kv * hd, d)
        w[f"{p}.self_attn.o_proj.weight"] = mat(d, h * hd)
        w[f"{p}.self_attn.q_norm.weight"] = norm(hd)
        w[f"{p}.self_attn.k_norm.weight"] = norm(hd)
        w[f"{p}.mlp.gate.weight"] = mat(e, d)
        w[f"{p}.mlp.switch_mlp.gate_proj.weight"] = mat(e, i_moe, d)
        w[f"{p}.mlp.switch_mlp.up_proj.weight"] = mat(e, i_moe, d)
        w[f"{p}.mlp.switch_mlp.down_proj.weight"] = mat(e, d, i_moe)
    return w


def _quantize(weights: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """mlx-community style affine quantization of every matrix (group size 64)."""
    import mlx.core as mx

    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if w.ndim < 2 or w.shape[-1] % 64 or name.endswith("norm.weight"):
            out[name] = w
            continue
        q, scales, biases = mx.quantize(mx.array(w), group_size=64, bits=bits)
        stem = name.removesuffix(".weight")
        out[name] = np.array(q)
        out[f"{stem}.scales"] = np.array(scales)
        out[f"{stem}.biases"] = np.array(biases)
    return out


def write_random_qwen3_moe(
    out: Path, overrides: dict[str, Any] | None = None, bits: int | None = None
) -> Path:
    """Write a checkpoint to ``out`` (config, safetensors, tokenizer, chat template).

    ``overrides`` change the config (e.g. a larger model for benchmarks); ``bits`` (4 or 8)
    stores every matrix quantized the way mlx-community checkpoints are.
    """
    from safetensors.numpy import save_file

    vocab = 256 + len(SPECIALS)
    config = {**CONFIG, "vocab_size": vocab, "eos_token_id": 256 + SPECIALS.index("<|im_end|>")}
    config.update(overrides or {})
    weights = _weights(config, config["vocab_size"])
    if bits is not None:
        weights = _quantize(weights, bits)
        config["quantization"] = {"group_size": 64, "bits": bits, "mode": "affine"}
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    _write_files(out, config)
    return out


def write_large_random_qwen3_moe(out: Path, overrides: dict[str, Any], bits: int = 4) -> Path:
    """A checkpoint at the size of a real one (Qwen3-30B-A3B: 17 GB at 4 bits), made fast.

    Weights come from MLX's generator on the default device, seeded from ``SEED`` and the
    layer, are quantized there, and go to one safetensors file per layer with an index, so
    memory holds one layer at a time. Not the same numbers ``write_random_qwen3_moe`` draws.
    """
    import mlx.core as mx

    vocab = 256 + len(SPECIALS)
    config = {**CONFIG, "vocab_size": vocab, "eos_token_id": 256 + SPECIALS.index("<|im_end|>")}
    config.update(overrides)
    config["quantization"] = {"group_size": 64, "bits": bits, "mode": "affine"}
    d, hd = config["hidden_size"], config["head_dim"]
    h, kv = config["num_attention_heads"], config["num_key_value_heads"]
    e, i_moe = config["num_experts"], config["moe_intermediate_size"]
    vocab = config["vocab_size"]
    out.mkdir(parents=True, exist_ok=True)
    layers = config["num_hidden_layers"]
    index: dict[str, str] = {}

    def save(part: int, shapes: dict[str, tuple[int, ...]]) -> None:
        key = mx.random.key(SEED * 1_000_003 + part)
        tensors: dict[str, mx.array] = {}
        for name, shape in shapes.items():
            key, sub = mx.random.split(key)
            if name.endswith("norm.weight"):
                tensors[name] = 1 + 0.1 * mx.random.normal(shape, key=sub)
                continue
            w = mx.random.normal(shape, key=sub) * shape[-1] ** -0.5
            q, scales, biases = mx.quantize(w, group_size=64, bits=8 if "mlp.gate" in name
                                            else bits)  # fmt: skip
            stem = name.removesuffix(".weight")
            tensors.update({name: q, f"{stem}.scales": scales, f"{stem}.biases": biases})
        file = f"model-{part:05d}-of-{layers + 1:05d}.safetensors"
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "mlx"})
        index.update(dict.fromkeys(tensors, file))

    save(0, {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
             "lm_head.weight": (vocab, d)})  # fmt: skip
    for layer in range(layers):
        p = f"model.layers.{layer}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        save(layer + 1, {
            f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
            f"{a}.q_proj.weight": (h * hd, d), f"{a}.k_proj.weight": (kv * hd, d),
            f"{a}.v_proj.weight": (kv * hd, d), f"{a}.o_proj.weight": (d, h * hd),
            f"{a}.q_norm.weight": (hd,), f"{a}.k_norm.weight": (hd,),
            f"{m}.gate.weight": (e, d),
            f"{m}.switch_mlp.gate_proj.weight": (e, i_moe, d),
            f"{m}.switch_mlp.up_proj.weight": (e, i_moe, d),
            f"{m}.switch_mlp.down_proj.weight": (e, d, i_moe),
        })  # fmt: skip
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=1)
    )
    for layer in range(layers):
        config["quantization"][f"model.layers.{layer}.mlp.gate"] = {"group_size": 64, "bits": 8}
    _write_files(out, config)
    return out


def _write_files(out: Path, config: dict[str, Any]) -> None:
    """Config, tokenizer and card beside the weights."""
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    tok_config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "README.md").write_text(
        "# random-qwen3_moe\n\nA qwen3_moe checkpoint with random weights made by mach from "
        f"seed {SEED}. It proves the pipeline runs; its text is noise.\n"
    )
