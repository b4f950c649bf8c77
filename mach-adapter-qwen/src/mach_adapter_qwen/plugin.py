"""Entry point of mach-adapter-qwen: registers the Qwen MoE architectures."""

from __future__ import annotations

from typing import Any

from mach import hookimpl


@hookimpl
def register_archs(register: Any) -> None:
    register("mach_adapter_qwen.adapters:Qwen3MoeAdapter", name="qwen3_moe")
    register("mach_adapter_qwen.adapters:Qwen3_5MoeAdapter", name="qwen3_5_moe")
