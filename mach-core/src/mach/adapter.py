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
    ``register_archs`` hook. Class attributes are the static capability fields reported by
    ``mach archs``; methods build the MLX model and map on-disk tensor names to engine names.
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
    tool_call_open: ClassVar[str] = "<tool_call>"
    """The text that starts a tool call in this family's output (held back while streaming)."""
    reasoning_tags: ClassVar[ReasoningTags | None] = None
    """Tags around reasoning text in this family's output (``<think>`` for Qwen), if any."""
    expert_stores: ClassVar[tuple[str, ...]] = ("resident", "streaming")
    cache_backends: ClassVar[tuple[str, ...]] = ("kv",)

    @abstractmethod
    def build_model(self, config: dict[str, Any]) -> nn.Module:
        """Build the family's MLX module with its routed-expert blocks unbound."""

    def sanitize(self, weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
        """Map every on-disk naming of the family to engine names (lazy arrays, no reads)."""
        return weights

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
    """``"module:function"`` of the family's own load path, called by ``load_moe`` with the
    checkpoint folder and every load option; ``None`` uses the generic pipeline."""

    def make_cache(self, model: nn.Module) -> list[LayerCache]:
        """One fresh per-sequence cache per decoder layer."""
        from mach.cache.kv import KVCache

        return [KVCache() for _ in model.layers]
