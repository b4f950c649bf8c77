"""Choosing and building the expert store: resident or streaming, from sidecar or safetensors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import mlx.core as mx

from mach.adapter import ExpertLayout, MoeArchAdapter
from mach.errors import CheckpointError
from mach.experts.bank import BankCache, PrefillMode, parse_size
from mach.experts.reader import ExpertReader
from mach.experts.sidecar import has_sidecar, read_sidecar
from mach.experts.sources import PARTS, PROJECTIONS, LayerSource, stacked_source
from mach.experts.store import ExpertStore, ResidentStackedExpertCache
from mach.experts.switch import SwitchSpec
from mach.io.checkpoint import Checkpoint

Residency = Literal["resident", "streaming", "bf16_streaming"]


class StackedStreamingWarning(UserWarning):
    """Streaming was asked of a checkpoint whose experts are stacked on axis 0."""


STACKED_GUARD = (
    "streaming from a stacked checkpoint: each expert is read as its own slice of the stacked "
    "tensors, at its file offset, into bounded banks; the stacked tensors are not loaded as "
    "resident banks. Use --no-streaming (streaming=False) only if you mean to hold every expert "
    "in memory. `mach convert` writes the sidecar format, which reads each expert in one request."
)


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def expert_sources(
    ckpt: Checkpoint, adapter: MoeArchAdapter, switches: Mapping[str, SwitchSpec]
) -> dict[str, LayerSource]:
    """Where each layer's experts live on disk: the sidecar, else the safetensors themselves."""
    if has_sidecar(ckpt.path):
        return read_sidecar(ckpt.path, switches)
    sources: dict[str, LayerSource] = {}
    for prefix, spec in switches.items():
        source = stacked_source(
            prefix, spec, ckpt.tensors, adapter.per_expert_name, adapter.stacked_names
        )
        if source is None:
            raise CheckpointError(
                f"{ckpt.path}: experts of {prefix} are stored in a form mach cannot read one by "
                "one (e.g. a fused gate_up tensor); run `mach convert SRC DST` once and stream "
                "from DST, or load with --no-streaming"
            )
        source.check()
        sources[prefix] = source
    return sources


def choose_residency(
    streaming: bool | None,
    residency: str | None,
    budget: int | str | None,
    expert_bytes: int,
    other_bytes: int,
) -> tuple[Residency, int | None]:
    """Resolve the knobs into a residency and, for streaming, a byte budget.

    Unset knobs mean: stream when a budget is given, or when experts plus the rest would not fit
    in 80% of physical memory; otherwise keep every expert resident.
    """
    if residency is not None and residency not in ("resident", "streaming", "bf16_streaming"):
        raise ValueError(
            f"expert_residency must be resident, streaming or bf16_streaming, got {residency!r}"
        )
    if streaming is False and residency not in (None, "resident"):
        raise ValueError(f"streaming=False contradicts expert_residency={residency!r}")
    chosen: Residency
    if residency is not None:
        chosen = residency  # type: ignore[assignment]
    elif streaming is not None:
        chosen = "streaming" if streaming else "resident"
    elif budget is not None:
        chosen = "streaming"
    else:
        memory = physical_memory()
        fits = not memory or expert_bytes + other_bytes <= 0.8 * memory
        chosen = "resident" if fits else "streaming"
    if chosen == "resident":
        if budget is not None:
            raise ValueError("an expert budget applies only to streaming; drop it or stream")
        return chosen, None
    if budget is not None:
        return chosen, parse_size(budget)
    memory = physical_memory() or 8 * 2**30
    return chosen, max(1, min(expert_bytes, int(0.4 * memory) - other_bytes))


def build_store(
    ckpt: Checkpoint,
    adapter: MoeArchAdapter,
    switches: Mapping[str, SwitchSpec],
    weights: dict[str, mx.array],
    where: Callable[[str], str],
    *,
    streaming: bool | None,
    residency: str | None,
    budget: int | str | None,
    prefill: PrefillMode,
    verify: bool,
) -> ExpertStore:
    """The expert store for a load; expert tensors are taken out of ``weights``."""
    sidecar = has_sidecar(ckpt.path)
    expert_names = {
        f"{p}.{proj}.{part}" for p in switches for proj in PROJECTIONS for part in PARTS
    }
    if sidecar:
        sources = read_sidecar(ckpt.path, switches)
        expert_bytes = sum(s.expert_bytes * s.spec.num_experts for s in sources.values())
    else:
        expert_bytes = sum(int(weights[n].nbytes) for n in expert_names if n in weights)
    other = sum(int(v.nbytes) for k, v in weights.items() if k not in expert_names)
    chosen, nbytes = choose_residency(streaming, residency, budget, expert_bytes, other)
    if chosen == "resident":
        if sidecar:
            reader = ExpertReader(verify=verify)
            try:
                for prefix, source in sources.items():
                    raws = reader.read(source, list(range(source.spec.num_experts)))
                    for name, piece in source.pieces.items():
                        weights[f"{prefix}.{name}"] = mx.stack([piece.to_mx(r[name]) for r in raws])
            finally:
                reader.close()
        fuse = os.environ.get("MACH_FUSE_GATE_UP", "1") not in ("0", "false", "no", "off")
        return ResidentStackedExpertCache.from_weights(weights, switches, where, fuse)
    for name in expert_names:
        weights.pop(name, None)
    if not sidecar:
        sources = expert_sources(ckpt, adapter, switches)
        if adapter.classify_layout(ckpt.tensor_names) is ExpertLayout.STACKED:
            warnings.warn(STACKED_GUARD, StackedStreamingWarning, stacklevel=3)
        if chosen == "bf16_streaming" and any(
            f"{proj}.scales" in s.pieces for s in sources.values() for proj in PROJECTIONS
        ):
            raise ValueError("bf16_streaming streams float experts; this checkpoint is quantized")
    assert nbytes is not None
    return BankCache(sources, nbytes, ExpertReader(verify=verify), prefill)
