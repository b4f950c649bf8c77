"""The Gemma 4 adapter (model code is imported only when a model is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mach.adapter import MoeArchAdapter

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from mach.cache.base import LayerCache
    from mach.chat.tool_calls import ParsedToolCall


class Gemma4Adapter(MoeArchAdapter):
    name = "gemma4"
    model_types = ("gemma4", "gemma4_text")
    architectures = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")
    description = "Gemma 4 MoE: gemma-4-26B-A4B (dense MLP beside experts, proportional RoPE)"
    kv_cache_kind = "rotating"
    specdec_kind = "specdec_v7"
    swiglu_variant = "geglu"
    cache_backends = ("kv", "rotating")

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from mach_adapter_gemma.gemma4 import Model, ModelArgs

        return Model(ModelArgs.from_config(config))

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        from mach_adapter_gemma.gemma4 import ModelArgs, sanitize

        return sanitize(weights, ModelArgs.from_config(config))

    tool_call_open = "<|tool_call>"

    def parse_tool_calls(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        from mach.chat.tool_calls import parse_gemma_tool_calls

        return parse_gemma_tool_calls(text)

    def stacked_names(self, switch: str, projection: str, part: str) -> tuple[str, ...]:
        nested = switch.replace("model.layers.", "language_model.model.layers.", 1)
        return (f"{switch}.{projection}.{part}", f"{nested}.switch_glu.{projection}.{part}")

    def make_cache(self, model: nn.Module) -> list[LayerCache]:
        return model.make_cache()  # type: ignore[no-any-return]
