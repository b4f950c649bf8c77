"""mach adapter for Gemma 4 MoE (gemma4)."""

from mach_adapter_gemma.adapter import Gemma4Adapter

__all__ = ["Gemma4Adapter"]
