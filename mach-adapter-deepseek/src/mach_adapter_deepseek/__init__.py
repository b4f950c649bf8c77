"""mach adapter for DeepSeek-V4 (deepseek_v4)."""

from mach_adapter_deepseek.adapter import DeepseekV4Adapter

__all__ = ["DeepseekV4Adapter"]
