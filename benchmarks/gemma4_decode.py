"""Decode speed of mach against mlx-lm on one synthetic gemma4 (26B-A4B shaped) checkpoint.

mlx-lm builds the random-weight model (4-bit); both engines load the same files in this process,
prefill a prompt longer than the sliding window and decode greedily.

    uv run --group bench python -m benchmarks.gemma4_decode
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.peer import quantize_4bit, run_synthetic, save_peer_model

TEXT = {
    "model_type": "gemma4_text", "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
    "global_head_dim": 128, "num_global_key_value_heads": 2, "attention_k_eq_v": True,
    "sliding_window": 128, "enable_moe_block": True, "num_experts": 32, "top_k_experts": 4,
    "moe_intermediate_size": 256, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0,
    "final_logit_softcapping": 30.0, "vocab_size": 4096, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "max_position_embeddings": 4096,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
}  # fmt: skip


def write_model(root: Path) -> Path:
    from mlx_lm.models import gemma4

    config = {"model_type": "gemma4", "vocab_size": TEXT["vocab_size"], "text_config": TEXT}
    model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    return save_peer_model(root, model, config, quantize_4bit(model))


def main() -> None:
    run_synthetic(
        __doc__,
        write_model,
        "gemma4 synthetic (6 layers, 32 experts, top-4, 4-bit)",
        prompt_tokens=256,
    )


if __name__ == "__main__":
    main()
