"""mach adapter for the Qwen MoE families."""

from mach_adapter_qwen.adapters import Qwen3MoeAdapter

__all__ = ["Qwen3MoeAdapter"]
