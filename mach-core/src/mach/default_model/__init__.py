"""mach's embedded default model, and random-weight qwen3_moe checkpoints for benchmarks."""

from mach.default_model.random_qwen3_moe import (
    write_large_random_qwen3_moe,
    write_random_qwen3_moe,
)
from mach.default_model.trained import DEFAULT_MODEL_NAME, default_model_path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_model_path",
    "write_large_random_qwen3_moe",
    "write_random_qwen3_moe",
]
