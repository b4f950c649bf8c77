"""Decode speed of mach against mlx-lm on one synthetic qwen3_5_moe (Gated DeltaNet) checkpoint.

mlx-lm builds the random-weight model (4-bit, mlx-community layout); both engines then load the
same files in this process, prefill a prompt, decode greedily, and the script prints the ratio.

    uv run --group bench python -m benchmarks.qwen3_5_decode
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.peer import quantize_4bit, run_synthetic, save_peer_model

TEXT = {
    "model_type": "qwen3_5_moe_text", "hidden_size": 512, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 64,
    "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "num_experts": 64,
    "num_experts_per_tok": 8, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256,
    "vocab_size": 4096, "rms_norm_eps": 1e-6, "full_attention_interval": 4,
    "max_position_embeddings": 4096, "rope_theta": 1e6, "partial_rotary_factor": 0.25,
    "tie_word_embeddings": False,
}  # fmt: skip


def write_model(root: Path) -> Path:
    from mlx_lm.models import qwen3_5_moe

    config = {"model_type": "qwen3_5_moe", "text_config": TEXT}
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(config))
    return save_peer_model(root, model, config, quantize_4bit(model))


def main() -> None:
    run_synthetic(
        __doc__,
        write_model,
        "qwen3_5_moe synthetic (8 layers, 64 experts, top-8, 4-bit)",
        prompt_tokens=128,
    )


if __name__ == "__main__":
    main()
