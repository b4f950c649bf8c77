"""The Qwen MoE adapters (light: model code is imported only when a model is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mach.adapter import MoeArchAdapter
from mach.chat.reasoning import ReasoningTags

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from mach.cache.base import LayerCache


class Qwen3MoeAdapter(MoeArchAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    description = "Qwen3-MoE: Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B"
    kv_cache_kind = "standard"
    specdec_kind = "specdec_v7"
    reasoning_tags = ReasoningTags()
    swiglu_variant = "swiglu"
    has_expert_bias = False

    def per_expert_name(self, switch: str, expert: int, projection: str, part: str) -> str:
        block = switch.removesuffix(".switch_mlp")
        return f"{block}.experts.{expert}.{projection}.{part}"

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from mach_adapter_qwen.qwen3_moe import Model, ModelArgs

        return Model(ModelArgs.from_config(config))

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        from mach_adapter_qwen.qwen3_moe import ModelArgs, sanitize

        return sanitize(weights, ModelArgs.from_config(config))


class Qwen3_5MoeAdapter(Qwen3MoeAdapter):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    architectures = ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")
    description = "Qwen3.5/3.6-MoE: Gated DeltaNet hybrid (35B-A3B, 122B-A10B, 397B-A17B)"
    kv_cache_kind = "hybrid_gdn"
    cache_backends = ("kv", "gdn")

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from mach_adapter_qwen.qwen3_5_moe import Model, ModelArgs

        return Model(ModelArgs.from_config(config))

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        from mach_adapter_qwen.qwen3_5_moe import ModelArgs, sanitize

        return sanitize(weights, ModelArgs.from_config(config))

    def stacked_names(self, switch: str, projection: str, part: str) -> tuple[str, ...]:
        name = f"{switch}.{projection}.{part}"
        return (name, "language_model." + name)

    def make_cache(self, model: nn.Module) -> list[LayerCache]:
        return model.make_cache()  # type: ignore[no-any-return]
