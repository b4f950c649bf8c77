"""mach adapter for DeepSeek-V4 (deepseek_v4)."""

from mach_adapter_deepseek.adapter import DeepseekV4Adapter
from mach_adapter_deepseek.load import load_v4_flash

__all__ = ["DeepseekV4Adapter", "load_v4_flash"]
