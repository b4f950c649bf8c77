"""The DeepSeek-V4 adapter (model code is imported only when a model is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mach.adapter import ExpertLayout, MoeArchAdapter

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from mach.cache.base import LayerCache
    from mach.experts.activations import GateActivation


class DeepseekV4Adapter(MoeArchAdapter):
    name = "deepseek_v4"
    model_types = ("deepseek_v4",)
    architectures = ("DeepseekV4ForCausalLM",)
    description = (
        "DeepSeek-V4: V4-Flash, V4-Pro (compressed sparse attention, hyper-connections, hash "
        "routing, FP8/FP4 release, MTP draft)"
    )
    kv_cache_kind = "compressed"
    specdec_kind = "mtp_eagle3"
    swiglu_variant = "clamped_swiglu"
    has_expert_bias = False
    layouts = (ExpertLayout.SLICED, ExpertLayout.STACKED)
    routed_quantization = ("float", "mxfp4", "affine4", "affine8")
    cache_backends = ("compressed",)
    load_path = "mach_adapter_deepseek.load:plan_v4_flash"

    def quantizable(self, path: str) -> bool:
        """``o_a_proj`` is block-diagonal: the attention reads its weight per head group."""
        return not path.endswith(".o_a_proj")

    def per_expert_name(self, switch: str, expert: int, projection: str, part: str) -> str | None:
        """The release's own names (``layers.N.ffn.experts.E.w1.weight`` / ``.scale``), so its
        FP4 experts stream in place; other layouts convert to the sidecar first."""
        names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
        parts = {"weight": "weight", "scales": "scale"}
        if part not in parts:
            return None
        layer = switch.removeprefix("model.layers.").split(".")[0]
        return f"layers.{layer}.ffn.experts.{expert}.{names[projection]}.{parts[part]}"

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from mach_adapter_deepseek.config import ModelArgs
        from mach_adapter_deepseek.model import Model

        return Model(ModelArgs.from_config(config))

    def gate_activation(self, config: dict[str, Any]) -> GateActivation:
        from mach_adapter_deepseek.config import ModelArgs
        from mach_adapter_deepseek.moe import expert_activation

        return expert_activation(ModelArgs.from_config(config))

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        from mach_adapter_deepseek.checkpoint import sanitize

        return sanitize(weights, config)

    def make_cache(self, model: nn.Module) -> list[LayerCache]:
        return model.make_cache()  # type: ignore[no-any-return]
