"""Pick the decode engine for a loaded checkpoint: speculative when its family drafts, batched
when asked for and its cache can batch, else target-only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mach.decode.engine import DecodeEngine, TargetEngine
from mach.errors import MachError

if TYPE_CHECKING:
    from mach.cache.prefix import PrefixCache
    from mach.io.load import LoadedModel


def batching_blocker(loaded: LoadedModel) -> str | None:
    """Why ``loaded`` cannot decode sequences in a batch, or ``None`` when it can."""
    from mach.cache.batch import batch_support

    reason = batch_support(loaded.cache.layers)
    return None if reason is None else f"{loaded.adapter.name}: {reason}"


def build_engine(
    loaded: LoadedModel,
    draft: bool | None = None,
    num_draft_tokens: int | None = None,
    prefix_cache: PrefixCache | None = None,
    max_batch: int = 1,
) -> DecodeEngine:
    """The engine for ``loaded``:

    - ``ContinuousBatchScheduler`` when ``max_batch > 1``, the model's cache can batch and no
      draft was asked for (``draft`` is not ``True``): many requests at once beat one faster;
    - else ``SpecDecEngine`` when the architecture has a draft family and the checkpoint
      carries its draft (``draft=None`` or ``True``);
    - else ``TargetEngine``.

    ``draft=True`` on a checkpoint without a usable draft raises, rather than silently
    decoding target-only; a drafting engine decodes one sequence at a time. ``prefix_cache``
    (``PrefixCache.for_model(loaded, ...)``) lets requests start from their longest cached
    prompt prefix.
    """
    from mach.decode.speculative import DraftGate, SpecDecEngine
    from mach.registry import make_drafter

    if max_batch < 1:
        raise MachError(f"max_batch must be at least 1, got {max_batch}")
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    ckpt = loaded.checkpoint
    batches = max_batch > 1 and draft is not True and batching_blocker(loaded) is None
    drafter = make_drafter(loaded) if draft is not False and not batches else None
    if drafter is None and draft:
        raise MachError(
            f"{ckpt.path}: {adapter.name} has no draft here (specdec_kind="
            f"{adapter.specdec_kind}; the checkpoint may not ship its draft weights, or the "
            "family's draft switch is off)"
        )
    if loaded.shard is not None and (batches or prefix_cache is not None):
        raise MachError(
            f"{loaded.shard.describe()} decodes one sequence at a time with no prompt cache in "
            "this version; use --max-batch 1 and no prompt cache"
        )
    if drafter is not None:
        gate = DraftGate.from_env(drafter.default_gate)
        engine = SpecDecEngine(model, tokenizer, loaded.cache.new, drafter, num_draft_tokens,
                               gate, prefix_cache=prefix_cache, passes=loaded.passes)  # fmt: skip
        if loaded.shard is not None:
            # Ranks must take the same passes: no switching on each rank's own clock.
            engine.measure = False
        return engine
    if batches:
        from mach.decode.batch_scheduler import ContinuousBatchScheduler

        return ContinuousBatchScheduler(model, tokenizer, loaded.cache.new, max_batch,
                                        prefix_cache=prefix_cache, store=loaded.store,
                                        passes=loaded.passes)  # fmt: skip
    return TargetEngine(model, tokenizer, loaded.cache.new, prefix_cache=prefix_cache,
                        passes=loaded.passes)  # fmt: skip
