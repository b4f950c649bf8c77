"""mach adapter for the Qwen MoE families."""

from mach_adapter_qwen.adapters import Qwen3_5MoeAdapter, Qwen3MoeAdapter

__all__ = ["Qwen3MoeAdapter", "Qwen3_5MoeAdapter"]
