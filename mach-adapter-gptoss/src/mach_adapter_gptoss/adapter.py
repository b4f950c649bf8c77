"""The GPT-OSS adapter (model code is imported only when a model is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mach.adapter import MoeArchAdapter

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from mach.cache.base import LayerCache
    from mach.experts.activations import GateActivation


class GptOssAdapter(MoeArchAdapter):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    architectures = ("GptOssForCausalLM",)
    description = "GPT-OSS: gpt-oss-20b, gpt-oss-120b (MXFP4 experts, sinks, sliding windows)"
    kv_cache_kind = "rotating"
    specdec_kind = "specdec_v7"
    swiglu_variant = "clamped_swiglu"
    has_expert_bias = True
    routed_quantization = ("float", "mxfp4", "affine4", "affine8")
    cache_backends = ("kv", "rotating")

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from mach_adapter_gptoss.gpt_oss import Model, ModelArgs

        return Model(ModelArgs.from_config(config))

    def gate_activation(self, config: dict[str, Any]) -> GateActivation:
        from mach.experts.activations import GateActivation
        from mach_adapter_gptoss.gpt_oss import ModelArgs

        args = ModelArgs.from_config(config)
        return GateActivation("clamped_swiglu", args.swiglu_alpha, args.swiglu_limit)

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        from mach_adapter_gptoss.gpt_oss import ModelArgs, sanitize

        return sanitize(weights, ModelArgs.from_config(config))

    def make_cache(self, model: nn.Module) -> list[LayerCache]:
        return model.make_cache()  # type: ignore[no-any-return]
