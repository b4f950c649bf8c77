"""mach adapter for GPT-OSS (gpt_oss)."""

from mach_adapter_gptoss.adapter import GptOssAdapter

__all__ = ["GptOssAdapter"]
