"""Every family's ``build_model`` rejects a broken config.json with a ``ConfigError`` that names
the key at fault, starting from the family's real fixture config."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mach.errors import ConfigError
from mach.registry import REGISTRY

FIXTURES = Path(__file__).parents[1] / "fixtures"
DELETE = object()


def assert_rejected(arch: str, layout: str, edits: dict[str, Any], message: str) -> None:
    """Apply ``edits`` (dotted key path -> new value, or ``DELETE``) to the fixture's config and
    check that building the model fails with ``message`` in the error."""
    config = json.loads((FIXTURES / arch / layout / "config.json").read_text())
    for path, value in edits.items():
        *parents, key = path.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        REGISTRY[arch].build_model(config)


@pytest.mark.parametrize(
    ("layout", "edits", "message"),
    [
        ("hf-per-expert", {"hidden_size": DELETE}, "hidden_size is missing"),
        ("hf-per-expert", {"num_local_experts": "eight"},
         'num_local_experts should be an integer of at least 0, found "eight"'),
        ("hf-fused", {"num_experts": DELETE}, "num_experts (or num_local_experts) is missing"),
        ("hf-fused", {"num_experts": "eight"}, 'num_experts should be an integer'),
        ("hf-per-expert", {"num_hidden_layers": 2.5},
         "num_hidden_layers should be a positive integer, found 2.5"),
        ("hf-per-expert", {"num_attention_heads": 0},
         "num_attention_heads should be a positive integer, found 0"),
        ("hf-per-expert", {"rms_norm_eps": "x"}, 'rms_norm_eps should be a number, found "x"'),
        ("hf-per-expert", {"mlp_only_layers": 3},
         "mlp_only_layers should be a list of integers, found 3"),
        ("hf-per-expert", {"norm_topk_prob": "yes"},
         'norm_topk_prob should be true or false, found "yes"'),
        ("hf-per-expert", {"decoder_sparse_step": 0}, "decoder_sparse_step should be a positive"),
        ("hf-per-expert", {"num_experts_per_tok": 9},
         "num_experts_per_tok (9) is more than num_local_experts (8)"),
        ("hf-per-expert", {"num_key_value_heads": 3},
         "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
        ("hf-fused", {"head_dim": DELETE, "hidden_size": 66},
         "hidden_size (66) is not a multiple of num_attention_heads (4); without head_dim"),
    ],
)  # fmt: skip
def test_qwen3_moe(layout: str, edits: dict[str, Any], message: str) -> None:
    assert_rejected("qwen3_moe", layout, edits, message)


@pytest.mark.parametrize(
    ("layout", "edits", "message"),
    [
        ("hf-fused-wrapper", {"text_config.hidden_size": DELETE},
         "text_config.hidden_size is missing"),
        ("hf-fused-wrapper", {"text_config.num_experts": "eight"},
         'text_config.num_experts should be a positive integer, found "eight"'),
        ("hf-fused-wrapper", {"text_config.layer_types": ["linear_attention", "local"] * 2},
         'text_config.layer_types[1] should be one of "linear_attention", "full_attention"'),
        ("hf-fused-wrapper", {"text_config.layer_types": ["full_attention"]},
         "text_config.layer_types has 1 entries but text_config.num_hidden_layers is 4"),
        ("hf-fused-wrapper", {"text_config": "none"}, 'text_config should be an object'),
        ("hf-per-expert", {"linear_key_head_dim": DELETE}, "linear_key_head_dim is missing"),
        ("hf-per-expert", {"tie_word_embeddings": "no"}, "tie_word_embeddings should be true"),
        ("hf-per-expert", {"linear_num_value_heads": 3},
         "linear_num_value_heads (3) is not a multiple of linear_num_key_heads (2)"),
        ("hf-per-expert", {"num_experts_per_tok": 9},
         "num_experts_per_tok (9) is more than num_experts (8)"),
        ("mlx-q4", {"text_config.num_key_value_heads": 3},
         "text_config.num_attention_heads (4) is not a multiple of "
         "text_config.num_key_value_heads (3)"),
    ],
)  # fmt: skip
def test_qwen3_5_moe(layout: str, edits: dict[str, Any], message: str) -> None:
    assert_rejected("qwen3_5_moe", layout, edits, message)


@pytest.mark.parametrize(
    ("layout", "edits", "message"),
    [
        ("hf-float", {"hidden_size": DELETE}, "hidden_size is missing"),
        ("hf-float", {"num_local_experts": DELETE},
         "num_local_experts (or num_experts) is missing"),
        ("hf-float", {"num_local_experts": DELETE, "num_experts": "eight"},
         'num_experts should be a positive integer, found "eight"'),
        ("hf-float", {"num_hidden_layers": 2.5}, "num_hidden_layers should be a positive integer"),
        ("hf-float", {"rms_norm_eps": "x"}, 'rms_norm_eps should be a number, found "x"'),
        ("hf-float", {"attention_bias": "yes"}, "attention_bias should be true or false"),
        ("hf-float", {"sliding_window": 0}, "sliding_window should be a positive integer"),
        ("hf-float", {"layer_types": ["sliding_attention", "global"]},
         'layer_types[1] should be one of "sliding_attention", "full_attention", found "global"'),
        ("hf-float", {"layer_types": ["full_attention"]},
         "layer_types has 1 entries but num_hidden_layers is 2"),
        ("mxfp4", {"num_experts_per_tok": 9},
         "num_experts_per_tok (9) is more than num_local_experts (8)"),
        ("mxfp4", {"num_key_value_heads": 3},
         "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ],
)  # fmt: skip
def test_gpt_oss(layout: str, edits: dict[str, Any], message: str) -> None:
    assert_rejected("gpt_oss", layout, edits, message)


@pytest.mark.parametrize(
    ("layout", "edits", "message"),
    [
        ("hf-wrapper", {"text_config.top_k_experts": DELETE},
         "text_config.top_k_experts is missing"),
        ("hf-wrapper", {"text_config.num_experts": "eight"},
         'text_config.num_experts should be a positive integer, found "eight"'),
        ("hf-wrapper", {"text_config.top_k_experts": 9},
         "text_config.top_k_experts (9) is more than text_config.num_experts (8)"),
        ("hf-wrapper", {"text_config.final_logit_softcapping": "x"},
         'text_config.final_logit_softcapping should be a number or null, found "x"'),
        ("hf-wrapper", {"text_config.per_layer_config.2.num_key_value_heads": 3},
         "text_config.num_attention_heads (4) is not a multiple of "
         "text_config.per_layer_config.2.num_key_value_heads (3)"),
        ("hf-wrapper", {"text_config.per_layer_config.2.head_dim": 0},
         "text_config.per_layer_config.2.head_dim should be a positive integer or null, found 0"),
        ("hf", {"hidden_size": DELETE}, "hidden_size is missing"),
        ("hf", {"num_hidden_layers": 2.5}, "num_hidden_layers should be a positive integer"),
        ("hf", {"rms_norm_eps": "x"}, 'rms_norm_eps should be a number, found "x"'),
        ("hf", {"attention_k_eq_v": "yes"}, "attention_k_eq_v should be true or false"),
        ("hf", {"layer_types": ["sliding_attention"]},
         "layer_types has 1 entries but num_hidden_layers is 3"),
        ("hf", {"num_key_value_heads": 3},
         "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
        ("mlx-q4", {"text_config.num_global_key_value_heads": 3},
         "text_config.num_attention_heads (4) is not a multiple of "
         "text_config.num_global_key_value_heads (3)"),
    ],
)  # fmt: skip
def test_gemma4(layout: str, edits: dict[str, Any], message: str) -> None:
    assert_rejected("gemma4", layout, edits, message)


@pytest.mark.parametrize(
    ("layout", "edits", "message"),
    [
        ("hf-fused", {"hidden_size": DELETE}, "hidden_size is missing"),
        ("hf-fused", {"n_routed_experts": "eight"},
         'n_routed_experts should be a positive integer, found "eight"'),
        ("hf-fused", {"num_hidden_layers": 2.5}, "num_hidden_layers should be a positive integer"),
        ("hf-fused", {"rms_norm_eps": "x"}, 'rms_norm_eps should be a number, found "x"'),
        ("hf-fused", {"tie_word_embeddings": "yes"}, "tie_word_embeddings should be true or false"),
        ("hf-fused", {"num_experts_per_tok": 9},
         "num_experts_per_tok (9) is more than n_routed_experts (8)"),
        ("hf-fused", {"o_groups": 3}, "num_attention_heads (4) is not a multiple of o_groups (3)"),
        ("hf-fused", {"layer_types": ["sliding_attention", "dense"]},
         'layer_types[1] should be one of "sliding_attention"'),
        ("hf-fused", {"mlp_layer_types": "moe"}, 'mlp_layer_types should be a list of strings'),
        ("hf-fused", {"compress_rates": {"compressed_sparse_attention": "four"}},
         'compress_rates.compressed_sparse_attention should be a positive integer, found "four"'),
        ("hf-fused", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
        ("upstream", {"head_dim": DELETE}, "head_dim is missing"),
        ("upstream", {"num_hash_layers": 2.5}, "num_hash_layers should be an integer"),
        ("upstream", {"compress_ratios": 4}, "compress_ratios should be a list of integers"),
        ("upstream", {"compress_ratios": [8, 4, 0]},
         "deepseek_v4 config lists 3 attention and 5 MoE layer types for 5 layers"),
        ("upstream", {"rope_scaling": "yarn"}, 'rope_scaling should be an object or null'),
    ],
)  # fmt: skip
def test_deepseek_v4(layout: str, edits: dict[str, Any], message: str) -> None:
    assert_rejected("deepseek_v4", layout, edits, message)
