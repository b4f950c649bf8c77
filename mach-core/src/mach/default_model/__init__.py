"""The model ``mach generate`` runs when no checkpoint is named."""

from mach.default_model.random_qwen3_moe import default_model_path, write_random_qwen3_moe

__all__ = ["default_model_path", "write_random_qwen3_moe"]
