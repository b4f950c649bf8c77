"""Random valid configs for the fidelity sweep, one drawing function per family.

Each function takes a numpy ``Generator`` and the case index and returns ``(kwargs, seq_len)``:
keyword arguments for the family's own transformers config class and a sequence length chosen
to cross the config's windows and chunk boundaries. Case 0 keeps every structural field at the
config class's default (only the sizes shrink), so transformers' own defaults are always tried.
Dimensions stay tiny so a case runs in well under a second on a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VOCAB = 256
Draw = tuple[dict[str, Any], int]


def _pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _heads(rng: np.random.Generator) -> tuple[int, int]:
    """(query heads, key/value heads) with a random GQA ratio."""
    kv = _pick(rng, [1, 2, 4])
    return kv * _pick(rng, [1, 2, 4]), kv


def _rope(rng: np.random.Generator, theta: float, partial: bool = False) -> dict[str, Any]:
    kind = _pick(rng, ["default", "default", "linear", "yarn"])
    rope: dict[str, Any] = {"rope_type": kind, "rope_theta": theta}
    if kind == "linear":
        rope["factor"] = float(_pick(rng, [2.0, 4.0]))
    elif kind == "yarn":
        rope.update(factor=float(_pick(rng, [4.0, 16.0, 32.0])), beta_fast=32.0, beta_slow=1.0,
                    original_max_position_embeddings=int(_pick(rng, [16, 64, 4096])))  # fmt: skip
        if rng.random() < 0.5:
            rope["truncate"] = False
    if partial:
        rope["partial_rotary_factor"] = float(_pick(rng, [0.25, 0.5, 1.0]))
    return rope


def qwen3_moe(rng: np.random.Generator, case: int) -> Draw:
    heads, kv = _heads(rng)
    layers = int(rng.integers(1, 5))
    experts = int(_pick(rng, [4, 8, 16]))
    kwargs: dict[str, Any] = {
        "hidden_size": int(_pick(rng, [32, 64])), "intermediate_size": 48,
        "moe_intermediate_size": int(_pick(rng, [16, 32])), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": int(_pick(rng, [8, 16, 32])), "num_experts": experts,
        "num_experts_per_tok": int(rng.integers(1, min(4, experts) + 1)),
    }  # fmt: skip
    if case:
        kwargs.update(
            norm_topk_prob=bool(rng.random() < 0.5),
            decoder_sparse_step=int(_pick(rng, [1, 1, 2])),
            mlp_only_layers=[i for i in range(layers) if rng.random() < 0.25],
            tie_word_embeddings=bool(rng.random() < 0.3),
            attention_bias=bool(rng.random() < 0.2),
            rope_parameters=_rope(rng, float(_pick(rng, [10000.0, 1e6]))),
        )
    return kwargs, int(rng.integers(2, 40))


def qwen3_5_moe(rng: np.random.Generator, case: int) -> Draw:
    heads, kv = _heads(rng)
    key_heads = int(_pick(rng, [1, 2]))
    layers = int(rng.integers(1, 6))
    experts = int(_pick(rng, [4, 8]))
    kwargs: dict[str, Any] = {
        "hidden_size": int(_pick(rng, [32, 64])), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": int(_pick(rng, [8, 16, 32])),
        "linear_num_key_heads": key_heads,
        "linear_num_value_heads": key_heads * int(_pick(rng, [1, 2])),
        "linear_key_head_dim": int(_pick(rng, [8, 16])),
        "linear_value_head_dim": int(_pick(rng, [8, 16])),
        "num_experts": experts, "num_experts_per_tok": int(rng.integers(1, 4)),
        "moe_intermediate_size": int(_pick(rng, [16, 32])),
        "shared_expert_intermediate_size": int(_pick(rng, [16, 32])),
    }  # fmt: skip
    if case:
        types = _pick(rng, ["interval", "random", "all_linear", "all_full"])
        if types == "random":
            kwargs["layer_types"] = [_pick(rng, ["linear_attention", "full_attention"])
                                     for _ in range(layers)]  # fmt: skip
        elif types != "interval":
            name = "linear_attention" if types == "all_linear" else "full_attention"
            kwargs["layer_types"] = [name] * layers
        kwargs.update(
            linear_conv_kernel_dim=int(_pick(rng, [2, 3, 4])),
            tie_word_embeddings=bool(rng.random() < 0.3),
            rope_parameters={"rope_type": "default",
                             "rope_theta": float(_pick(rng, [10000.0, 1e7])),
                             "partial_rotary_factor": float(_pick(rng, [0.25, 0.5, 1.0]))},
        )  # fmt: skip
    # The chunked delta rule works in 64-token chunks: cross one boundary or two.
    return kwargs, int(_pick(rng, [int(rng.integers(2, 64)), int(rng.integers(64, 140))]))


def gpt_oss(rng: np.random.Generator, case: int) -> Draw:
    heads, kv = _heads(rng)
    layers = int(rng.integers(1, 5))
    experts = int(_pick(rng, [4, 8, 16]))
    window = int(_pick(rng, [2, 4, 8, 16, 128]))
    kwargs: dict[str, Any] = {
        "hidden_size": int(_pick(rng, [32, 64])), "intermediate_size": int(_pick(rng, [16, 32])),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": int(_pick(rng, [8, 16, 32])), "num_local_experts": experts,
        "num_experts_per_tok": int(rng.integers(1, min(4, experts) + 1)),
        "sliding_window": window,
    }  # fmt: skip
    if case:
        if rng.random() < 0.5:
            kwargs["layer_types"] = [_pick(rng, ["sliding_attention", "full_attention"])
                                     for _ in range(layers)]  # fmt: skip
        kwargs.update(
            tie_word_embeddings=bool(rng.random() < 0.2),
            attention_bias=bool(rng.random() < 0.8),
            swiglu_limit=float(_pick(rng, [7.0, 1.0])),
            rope_parameters=_rope(rng, 150000.0),
        )
    return kwargs, int(rng.integers(2, min(window, 20) * 2 + 4))


def gemma4(rng: np.random.Generator, case: int) -> Draw:
    heads, kv = _heads(rng)
    layers = int(rng.integers(1, 5))
    experts = int(_pick(rng, [4, 8]))
    window = int(_pick(rng, [2, 4, 6, 16]))
    kwargs: dict[str, Any] = {
        "hidden_size": int(_pick(rng, [32, 64])), "intermediate_size": int(_pick(rng, [32, 64])),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": int(_pick(rng, [8, 16])), "global_head_dim": int(_pick(rng, [16, 32])),
        "enable_moe_block": True, "num_experts": experts,
        "top_k_experts": int(rng.integers(1, min(4, experts) + 1)),
        "moe_intermediate_size": int(_pick(rng, [16, 32])),
        "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "sliding_window": window,
    }  # fmt: skip
    if case:
        kwargs["layer_types"] = [_pick(rng, ["sliding_attention", "full_attention"])
                                 for _ in range(layers)]  # fmt: skip
        k_eq_v = bool(rng.random() < 0.5)
        kwargs.update(
            attention_k_eq_v=k_eq_v,
            final_logit_softcapping=_pick(rng, [None, 30.0, 5.0]),
            tie_word_embeddings=bool(rng.random() < 0.7),
            rope_parameters={
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": float(_pick(rng, [10000.0, 100.0]))},
                "full_attention": {"rope_type": _pick(rng, ["proportional", "default"]),
                                   "partial_rotary_factor": float(_pick(rng, [0.25, 0.5, 1.0])),
                                   "rope_theta": 1e6},
            },
        )  # fmt: skip
        if k_eq_v:
            kwargs["num_global_key_value_heads"] = int(_pick(rng, [1, kv]))
    return kwargs, int(rng.integers(2, window * 3 + 4))


def deepseek_v4(rng: np.random.Generator, case: int) -> Draw:
    layers = int(rng.integers(1, 6))
    head_dim = int(_pick(rng, [16, 32]))
    groups = int(_pick(rng, [1, 2, 4]))
    heads = groups * int(_pick(rng, [1, 2]))
    experts = int(_pick(rng, [4, 8]))
    csa, hca = int(_pick(rng, [2, 4, 8])), int(_pick(rng, [4, 8, 16, 128]))
    window = int(_pick(rng, [4, 8, 16]))
    kwargs: dict[str, Any] = {
        "hidden_size": int(_pick(rng, [32, 64])),
        "moe_intermediate_size": int(_pick(rng, [16, 32])), "num_hidden_layers": layers,
        "num_attention_heads": heads, "head_dim": head_dim,
        "q_lora_rank": int(_pick(rng, [16, 32])), "o_groups": groups,
        "o_lora_rank": int(_pick(rng, [8, 16])), "n_routed_experts": experts,
        "num_experts_per_tok": int(rng.integers(1, min(4, experts) + 1)),
        "index_n_heads": int(_pick(rng, [2, 4, 16])), "index_head_dim": int(_pick(rng, [8, 16])),
        "partial_rotary_factor": float(_pick(rng, [0.125, 0.25, 0.5])) if case else None,
        "index_topk": int(_pick(rng, [1, 2, 3, 8])), "sliding_window": window,
        "hc_mult": int(_pick(rng, [2, 4])), "max_position_embeddings": 1024,
    }  # fmt: skip
    # The indexer's keys carry the same rotation as attention's, so they must be as wide.
    rope_dims = int(head_dim * (kwargs.pop("partial_rotary_factor") or 0.125))
    if rope_dims > kwargs["index_head_dim"]:
        kwargs["index_head_dim"] = rope_dims
    if case:
        kwargs["partial_rotary_factor"] = rope_dims / head_dim
        kinds = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
        if rng.random() < 0.6:
            kwargs["layer_types"] = [_pick(rng, kinds) for _ in range(layers)]
        if rng.random() < 0.6:
            kwargs["mlp_layer_types"] = [_pick(rng, ["hash_moe", "moe"]) for _ in range(layers)]
        kwargs.update(
            compress_rates={kinds[1]: csa, kinds[2]: hca},
            tie_word_embeddings=bool(rng.random() < 0.2),
            routed_scaling_factor=float(_pick(rng, [1.0, 1.5, 2.5])),
            swiglu_limit=float(_pick(rng, [10.0, 0.5])),
        )
        if rng.random() < 0.5:
            kwargs["rope_parameters"] = {
                "rope_type": "yarn", "factor": float(_pick(rng, [4.0, 16.0])),
                "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": int(_pick(rng, [16, 64])),
            }  # fmt: skip
    else:
        hca = 128
    # Cross the sliding window and several CSA windows; sometimes an HCA window too.
    longest = max(window, 4 * csa, hca + 2 if hca <= 16 else 0) + 8
    return kwargs, int(rng.integers(2, min(longest, 72) + 1))


FAMILIES = {
    "qwen3_moe": qwen3_moe,
    "qwen3_5_moe": qwen3_5_moe,
    "gpt_oss": gpt_oss,
    "gemma4": gemma4,
    "deepseek_v4": deepseek_v4,
}
