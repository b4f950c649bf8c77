"""The load pipeline: checkpoint -> plan -> model with experts bound to a store."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mach.adapter import MoeArchAdapter
from mach.cache.base import LayerCache, SequenceCache
from mach.cache.kv_quant import quantized_kv
from mach.decode.compiled import CompiledPasses
from mach.errors import AdapterError, OptionsError
from mach.experts.parallel import (
    ExpertShard,
    Shard,
    launched_shard,
    shard_resident,
    shard_sources,
)
from mach.experts.store import ExpertStore, ResidentStackedExpertCache
from mach.experts.swap import swap_switch_mlp
from mach.io.checkpoint import Checkpoint
from mach.io.options import LoadOptions
from mach.io.paths import resolve_model_path
from mach.io.plan import LoadPlan, plan_load
from mach.io.prewarm import prewarm
from mach.io.ranks import check_ranks_agree
from mach.io.residency import ExpertPlan, build_store
from mach.layers.pipeline import PipelineStage, install_stage, stage_caches
from mach.registry import arch_summary
from mach.tokenizer.tokenizer import Tokenizer

__all__ = ["LoadOptions", "LoadedModel", "load", "load_moe", "load_plan", "resolve_model_path"]

log = logging.getLogger("mach.load")
"""One INFO line as a load starts and one as it ends; the CLI shows them on stderr."""


@dataclass(eq=False)
class LoadedModel:
    """A loaded checkpoint. Unpacks as ``(model, tokenizer, store, cache)``.

    It also carries what the load decided, so callers take facts from here instead of reading
    the checkpoint again: the adapter, the opened checkpoint (config, tensor headers, files),
    the validated options, the expert plan (residency, budget, layout, routed format) and the
    architecture summary.
    """

    model: nn.Module
    tokenizer: Tokenizer | None
    store: ExpertStore
    cache: SequenceCache
    adapter: MoeArchAdapter
    checkpoint: Checkpoint
    options: LoadOptions
    plan: LoadPlan = field(repr=False)
    prewarm_seconds: float | None = None
    """Seconds the load spent prewarming (``None``: it did not)."""
    shard: Shard | None = None
    """This rank's share of the model under ``mlx.launch``: an ``ExpertShard`` or a
    ``PipelineStage`` (``None``: one process)."""
    passes: CompiledPasses | None = None
    """The model's compiled decode passes (``None``: ``compile=False``)."""

    @property
    def experts(self) -> ExpertPlan:
        return self.plan.experts

    @property
    def summary(self) -> dict[str, Any]:
        """``arch_summary`` of the adapter (what ``mach archs`` and ``/v1/capabilities`` show)."""
        return arch_summary(self.adapter)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.store, self.cache))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        return (self.model, self.tokenizer, self.store, self.cache)[index]


def _check_caches(adapter: MoeArchAdapter, caches: list[LayerCache]) -> None:
    kinds = sorted({getattr(c, "kind", type(c).__name__) for c in caches})
    undeclared = [k for k in kinds if k not in adapter.cache_backends]
    if undeclared:
        raise AdapterError(
            f"{adapter.name}: make_cache returns {', '.join(undeclared)} caches, which its "
            f"cache_backends ({', '.join(adapter.cache_backends)}) do not declare"
        )


def load_plan(plan: LoadPlan, progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Carry out ``plan``: read the expert store and the weights, build the caches."""
    adapter, ckpt, model = plan.adapter, plan.checkpoint, plan.model
    shard = launched_shard(plan.options.parallel)
    if shard is not None:
        check_ranks_agree(shard, ckpt, plan.options)
    experts = plan.experts
    if isinstance(shard, PipelineStage):
        experts = _keep_layers(plan, install_stage(model, shard))
    elif isinstance(shard, ExpertShard) and experts.sources:
        # Each rank's banks (or its resident sidecar read) take only its experts.
        experts = replace(experts, sources=shard_sources(experts.sources, shard))
    store = build_store(experts, plan.options, ckpt, adapter)
    if isinstance(shard, ExpertShard) and experts.resident is not None:
        store = shard_resident(experts.resident, shard)
    total = sum(info.nbytes for info in ckpt.tensors.values())
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done = min(total, done + nbytes)
        if progress is not None:
            progress(done, total)

    store.materialize(advance)
    swap_switch_mlp(model, store, plan.options.gather_dispatch,
                    shard if isinstance(shard, ExpertShard) else None)  # fmt: skip
    model.load_weights(list(plan.weights.items()), strict=True)
    plan.weights.clear()
    mx.eval(model.parameters())
    advance(total)
    model.eval()
    if plan.tokenizer is None:
        warnings.warn(
            f"{ckpt.path}: no tokenizer.json; the model loads for token-id use only",
            stacklevel=3,
        )

    options = plan.options

    def family_caches() -> list[LayerCache]:
        return adapter.make_cache(model)

    def quantized() -> list[LayerCache]:
        caches = family_caches()
        if options.kv_bits is None:
            return caches
        return quantized_kv(caches, options.kv_format, options.kv_bits)

    def factory() -> list[LayerCache]:
        if isinstance(shard, PipelineStage):
            return stage_caches(quantized(), shard)
        return quantized()

    _check_caches(adapter, family_caches())
    caches = factory()
    swapped = [type(c) is not type(f) for c, f in zip(quantized(), family_caches(), strict=True)]
    if options.kv_bits is not None and not any(swapped):
        raise OptionsError(f"{adapter.name}: kv_bits quantizes full-attention KV caches, and "
                           f"this model has none ({adapter.kv_cache_kind} caches); leave "
                           "--kv-bits off")  # fmt: skip
    passes = CompiledPasses(model) if options.compile else None
    warm = prewarm(model, factory, passes) if options.prewarm else None
    return LoadedModel(model, plan.tokenizer, store, SequenceCache(caches, factory), adapter, ckpt,
                       plan.options, plan, warm, shard, passes)  # fmt: skip


def _keep_layers(plan: LoadPlan, remote: list[str]) -> ExpertPlan:
    """Drop the weights and experts of the layers other pipeline stages run from ``plan``."""

    def elsewhere(name: str) -> bool:
        return any(name.startswith(f"{path}.") for path in remote)

    for name in [n for n in plan.weights if elsewhere(n)]:
        del plan.weights[name]
    experts = plan.experts
    sources = {p: s for p, s in experts.sources.items() if not elsewhere(p)}
    resident = experts.resident
    if resident is not None:
        resident = ResidentStackedExpertCache(
            {p: layer for p, layer in resident.layers.items() if not elsewhere(p)}
        )
    return replace(experts, sources=sources, resident=resident)


def load_moe(
    checkpoint: str | os.PathLike[str] | Checkpoint,
    arch: str | None = None,
    *,
    options: LoadOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load a MoE checkpoint; the result unpacks as ``(model, tokenizer, store, cache)``.

    Options come as one ``LoadOptions`` or as its fields by keyword (``dtype``, ``streaming``,
    ``expert_budget``, ``expert_residency``, ``prefill``, ``gather_dispatch``,
    ``verify_experts``, ``streaming_embedding``); every value is validated before anything is
    read. Steps: read ``config.json`` and safetensors headers; ``detect_arch``; the adapter's
    planner builds the model, plans the expert store and checks every name and shape; then the
    store and the weights are read. ``progress(done, total)`` is called with bytes as weights
    are read, and the ``mach.load`` logger says when the load starts and ends. ``tokenizer`` is
    ``None`` (with a warning) without ``tokenizer.json``.

    Expert residency: ``streaming=True`` (or an ``expert_budget`` such as ``"2GB"``) keeps a
    bounded bank of experts per layer and reads misses from disk; ``streaming=False`` keeps every
    expert resident. Left unset, mach streams only when the model would not fit in memory.
    ``expert_residency="bf16_streaming"`` streams float experts into bfloat16 banks.
    """
    if options is None:
        options = LoadOptions.from_kwargs(arch=arch, **kwargs)
    elif kwargs or (arch is not None and arch != options.arch):
        raise OptionsError("give load options either as LoadOptions or as keywords, not both")
    start = time.perf_counter()
    where = checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint
    log.info("opening %s", where)
    plan = plan_load(checkpoint, options)
    loaded = load_plan(plan, progress)
    experts = plan.experts
    log.info(
        "loaded %s (%s layout, %s experts, %s store, %s) in %.1f s",
        plan.adapter.name, experts.layout, experts.quantization, experts.residency,
        _size(plan.memory_bytes), time.perf_counter() - start,
    )  # fmt: skip
    if loaded.prewarm_seconds is not None:
        log.info("prewarmed in %.2f s (one prompt chunk and one decode step)",
                 loaded.prewarm_seconds)  # fmt: skip
    return loaded


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def load(repo_or_path: str | os.PathLike[str], **kwargs: Any) -> LoadedModel:
    """``load_moe`` with the architecture detected from the checkpoint."""
    return load_moe(repo_or_path, **kwargs)
