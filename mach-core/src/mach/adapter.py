"""``MoeArchAdapter``: everything mach needs to know about one architecture."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from mach.cache.base import LayerCache
    from mach.chat.reasoning import ReasoningTags
    from mach.chat.tool_calls import ParsedToolCall
    from mach.experts.activations import GateActivation
    from mach.io.checkpoint import Checkpoint
    from mach.io.options import LoadOptions
    from mach.io.plan import LoadPlan

KvCacheKind = Literal["standard", "hybrid_gdn", "compressed", "rotating"]
SpecDecKind = Literal["specdec_v7", "mtp_eagle3"]
SwigluVariant = Literal["swiglu", "geglu", "clamped_swiglu"]


class ExpertLayout(str, Enum):
    """How routed experts sit on disk."""

    SLICED = "sliced"
    """One record or tensor set per expert (HF per-expert names, the engine's sidecar)."""
    STACKED = "stacked"
    """All experts of a layer concatenated on axis 0 (HF fused, mlx-community)."""


_SLICED_NAME = re.compile(r"\.experts\.\d+\.")
_STACKED_NAME = re.compile(r"\.(switch_mlp|switch_glu)\.|\.experts\.(gate_up_proj|down_proj)\b")


class MoeArchAdapter(ABC):
    """One architecture key: model construction, weight naming and capabilities.

    Subclass it in an adapter distribution and register the subclass from a
    ``register_archs`` hook. Class attributes are the capability fields reported by
    ``mach archs``; methods build the MLX model and map on-disk tensor names to engine names.
    The loader acts on the fields, so they cannot drift from what runs: routed experts get
    ``gate_activation`` (of kind ``swiglu_variant``) and a bias exactly when
    ``has_expert_bias``; a checkpoint whose layout or routed format is not listed, a store not
    in ``expert_stores`` or a cache not in ``cache_backends`` is refused with an error.
    """

    name: ClassVar[str]
    """The arch key, e.g. ``qwen3_moe``."""
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.json`` ``model_type`` values this adapter claims."""
    architectures: ClassVar[tuple[str, ...]] = ()
    """``config.json`` ``architectures`` entries this adapter claims."""
    description: ClassVar[str] = ""

    kv_cache_kind: ClassVar[KvCacheKind] = "standard"
    specdec_kind: ClassVar[SpecDecKind | None] = None
    swiglu_variant: ClassVar[SwigluVariant] = "swiglu"
    has_expert_bias: ClassVar[bool] = False
    layouts: ClassVar[tuple[ExpertLayout, ...]] = (ExpertLayout.SLICED, ExpertLayout.STACKED)
    routed_quantization: ClassVar[tuple[str, ...]] = ("float", "affine4", "affine8")
    """Routed-expert formats it runs: ``float`` (any float dtype), ``affine<bits>``, ``mxfp4``."""
    tool_call_open: ClassVar[str] = "<tool_call>"
    """The text that starts a tool call in this family's output (held back while streaming)."""
    reasoning_tags: ClassVar[ReasoningTags | None] = None
    """Tags around reasoning text in this family's output (``<think>`` for Qwen), if any."""
    expert_stores: ClassVar[tuple[str, ...]] = ("resident", "streaming", "bf16_streaming")
    cache_backends: ClassVar[tuple[str, ...]] = ("kv",)
    """Cache kinds ``make_cache`` returns (each cache's ``kind``: kv, rotating, gdn ...)."""
    checkpoint_files: ClassVar[tuple[str, ...]] = ()
    """Files (glob patterns inside the checkpoint) the family reads beyond mach's standard set
    (config, weights, tokenizer, chat template, draft); ``mach download`` fetches them too."""

    @abstractmethod
    def build_model(self, config: dict[str, Any]) -> nn.Module:
        """Build the family's MLX module with its routed-expert blocks unbound."""

    def gate_activation(self, config: dict[str, Any]) -> GateActivation:
        """The routed experts' activation for ``config``; its kind must be ``swiglu_variant``.

        Override to read parameters from the config (GPT-OSS's alpha and limit).
        """
        from mach.experts.activations import GateActivation

        return GateActivation(self.swiglu_variant)

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        """Map every on-disk naming of the family to engine names (lazy arrays, no reads)."""
        return weights

    def quantizable(self, path: str) -> bool:
        """Whether ``mach convert --bits`` may quantize the module at engine path ``path``.

        Every linear layer and embedding may by default; a family says no for a module whose
        weight the model reads as a plain array (a grouped projection, say).
        """
        return True

    def stacked_names(self, switch: str, projection: str, part: str) -> tuple[str, ...]:
        """On-disk names a layer's stacked ``[experts, ...]`` tensor may have (engine name first).

        Streaming reads stacked checkpoints in place under these names; a family whose
        converted checkpoints nest the model (``language_model.``) adds those spellings.
        """
        return (f"{switch}.{projection}.{part}",)

    def per_expert_name(self, switch: str, expert: int, projection: str, part: str) -> str | None:
        """The on-disk name of one expert's tensor when experts are stored one per tensor.

        ``switch`` is the engine path of the layer's experts (``model.layers.3.mlp.switch_mlp``),
        ``projection`` is ``gate_proj``, ``up_proj`` or ``down_proj`` and ``part`` is ``weight``,
        ``scales``, ``biases`` or ``bias``. Streaming uses it to read such checkpoints in place;
        ``None`` (the default) means they must be converted first.
        """
        return None

    def parse_tool_calls(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """Content and tool calls in generated text; the default reads ``<tool_call>`` JSON."""
        from mach.chat.tool_calls import parse_tool_calls

        return parse_tool_calls(text)

    def classify_layout(self, tensor_names: Iterable[str]) -> ExpertLayout:
        """Whether the checkpoint stores routed experts per expert or stacked on axis 0."""
        names = list(tensor_names)
        if any(_SLICED_NAME.search(n) for n in names):
            return ExpertLayout.SLICED
        if any(_STACKED_NAME.search(n) for n in names):
            return ExpertLayout.STACKED
        return ExpertLayout.SLICED

    load_path: ClassVar[str | None] = None
    """``"module:function"`` of the family's own load path: ``f(checkpoint, adapter, options)``
    returning a ``LoadPlan``, usually after family-specific header checks around
    ``mach.io.plan.plan_checkpoint``. ``load_moe`` executes the plan and ``mach check`` reports
    it, so both run the family's checks; ``None`` uses the generic planner."""

    def plan(self, checkpoint: Checkpoint, options: LoadOptions) -> LoadPlan:
        """Plan loading ``checkpoint``: the family's ``load_path``, else the generic planner."""
        from mach.io.plan import plan_checkpoint
        from mach.registry import load_object

        if self.load_path is None:
            return plan_checkpoint(checkpoint, self, options)
        planner = load_object(self.load_path, f"{self.name} load_path")
        return planner(checkpoint, self, options)  # type: ignore[no-any-return]

    def make_cache(self, model: nn.Module) -> list[LayerCache]:
        """One fresh per-sequence cache per decoder layer."""
        from mach.cache.kv import KVCache

        return [KVCache() for _ in model.layers]
