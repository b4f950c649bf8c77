"""Pick the decode engine for a loaded checkpoint: speculative when its family drafts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mach.decode.engine import DecodeEngine, TargetEngine
from mach.errors import MachError

if TYPE_CHECKING:
    from mach.cache.prefix import PrefixCache
    from mach.io.load import LoadedModel


def build_engine(
    loaded: LoadedModel,
    draft: bool | None = None,
    num_draft_tokens: int | None = None,
    prefix_cache: PrefixCache | None = None,
) -> DecodeEngine:
    """``SpecDecEngine`` when the architecture has a draft family and the checkpoint carries
    its draft (``draft=None`` or ``True``), else ``TargetEngine``.

    ``draft=True`` on a checkpoint without a usable draft raises, rather than silently
    decoding target-only. ``prefix_cache`` (``PrefixCache.for_model(loaded, ...)``) lets
    requests start from their longest cached prompt prefix.
    """
    from mach.decode.speculative import DraftGate, SpecDecEngine
    from mach.registry import make_drafter

    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    ckpt = loaded.checkpoint
    if draft is False:
        return TargetEngine(model, tokenizer, loaded.cache.new, prefix_cache=prefix_cache)
    drafter = make_drafter(loaded)
    if drafter is None:
        if draft:
            raise MachError(
                f"{ckpt.path}: {adapter.name} has no draft here (specdec_kind="
                f"{adapter.specdec_kind}; the checkpoint may not ship its draft weights, or the "
                "family's draft switch is off)"
            )
        return TargetEngine(model, tokenizer, loaded.cache.new, prefix_cache=prefix_cache)
    gate = DraftGate.from_env(drafter.default_gate)
    return SpecDecEngine(model, tokenizer, loaded.cache.new, drafter, num_draft_tokens, gate,
                         prefix_cache=prefix_cache)  # fmt: skip
