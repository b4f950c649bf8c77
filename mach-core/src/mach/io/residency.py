"""Planning and building the expert store: resident or streaming, from sidecar or safetensors.

``plan_experts`` decides everything from headers and lazy arrays (which store, its budget, how
many slots, what it will hold in memory, where each expert is read from) and checks the expert
tensors against the model; ``build_store`` turns that plan into the store, reading data.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import mlx.core as mx

from mach.adapter import ExpertLayout, MoeArchAdapter
from mach.env import env_flag
from mach.errors import AdapterError, CheckpointError, ShapeMismatchError
from mach.experts.bank import BankCache, SlotPoolMode, check_budget, check_shared_pool, slot_bytes
from mach.experts.reader import ExpertReader
from mach.experts.sidecar import has_sidecar, read_sidecar
from mach.experts.sources import PARTS, PROJECTIONS, LayerSource, stacked_source
from mach.experts.store import ExpertStore, ResidentStackedExpertCache
from mach.experts.switch import SwitchSpec
from mach.io.checkpoint import Checkpoint
from mach.io.options import LoadOptions, Residency

FLOAT_FORMATS = {"float32", "float16", "bfloat16"}


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


def format_family(quantization: str) -> str:
    """``float`` for any float dtype, else the format itself (``affine4``, ``mxfp4`` ...)."""
    return "float" if quantization in FLOAT_FORMATS else quantization


@dataclass
class ExpertPlan:
    """What the expert store of a load will be, decided before any expert data is read."""

    residency: Residency
    layout: str
    """``sidecar``, ``sliced`` or ``stacked``: where experts are read from."""
    quantization: str
    """The routed experts' format: ``float32``, ``bfloat16``, ``affine4``, ``mxfp4`` ..."""
    expert_bytes: int
    """Bytes of every routed expert as stored on disk."""
    memory_bytes: int
    """Bytes of expert weights the store will hold in memory."""
    budget_bytes: int | None = None
    slots_per_layer: int = 0
    """Slots in each layer's bank (0 with a shared pool)."""
    slot_bytes: int = 0
    """Bytes one slot costs: one expert of every layer, or one expert with a shared pool."""
    sources: dict[str, LayerSource] = field(default_factory=dict, repr=False)
    resident: ResidentStackedExpertCache | None = field(default=None, repr=False)
    """The resident store over lazy arrays (safetensors experts); data is read on materialize."""
    slot_pool: SlotPoolMode = "layer"
    pool_slots: int = 0
    """Slots of the shared pool (0 with per-layer banks)."""

    @property
    def streaming(self) -> bool:
        return self.residency != "resident"


def expert_format(
    dtype: str, packed_width: int, input_dims: int, scales: bool, biases: bool
) -> str:
    """A routed projection's format from what its headers say: ``float32``, ``affine4``, ``mxfp4``.

    ``packed_width`` is the last dimension of the stored weight; affine bits follow from how
    many 32-bit words hold one row of ``input_dims`` inputs.
    """
    if not scales:
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(dtype, dtype)
    if not biases:
        return "mxfp4"
    return f"affine{packed_width * 32 // input_dims}"


_MX_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
             mx.uint8: "U8"}  # fmt: skip


def _weights_format(weights: Mapping[str, mx.array], prefix: str, spec: SwitchSpec) -> str:
    weight = weights.get(f"{prefix}.gate_proj.weight")
    if weight is None:
        return "none"
    return expert_format(_MX_NAMES.get(weight.dtype, str(weight.dtype)), weight.shape[-1],
                         spec.input_dims, f"{prefix}.gate_proj.scales" in weights,
                         f"{prefix}.gate_proj.biases" in weights)  # fmt: skip


def _source_format(source: LayerSource) -> str:
    weight = source.pieces["gate_proj.weight"]
    return expert_format(weight.dtype, weight.shape[-1], source.spec.input_dims,
                         "gate_proj.scales" in source.pieces,
                         "gate_proj.biases" in source.pieces)  # fmt: skip


def expert_names(switches: Mapping[str, SwitchSpec]) -> set[str]:
    return {f"{p}.{proj}.{part}" for p in switches for proj in PROJECTIONS for part in PARTS}


def _stream_sources(
    ckpt: Checkpoint, adapter: MoeArchAdapter, switches: Mapping[str, SwitchSpec]
) -> dict[str, LayerSource]:
    """Where each layer's experts live inside the safetensors, read one expert at a time."""
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
    options: LoadOptions, expert_bytes: int, other_bytes: int
) -> tuple[Residency, int | None]:
    """The residency and, for streaming, the byte budget a load with ``options`` uses.

    Unset knobs mean: stream when a budget is given, or when experts plus the rest would not fit
    in 80% of physical memory; otherwise keep every expert resident. The default budget is what
    is left of 40% of memory after the non-expert weights, at most every expert.
    """
    chosen: Residency
    if options.expert_residency is not None:
        chosen = options.expert_residency
    elif options.streaming is not None:
        chosen = "streaming" if options.streaming else "resident"
    elif options.expert_budget is not None:
        chosen = "streaming"
    else:
        memory = physical_memory()
        fits = not memory or expert_bytes + other_bytes <= 0.8 * memory
        chosen = "resident" if fits else "streaming"
    if chosen == "resident":
        return chosen, None
    if options.expert_budget is not None:
        return chosen, options.expert_budget
    memory = physical_memory() or 8 * 2**30
    return chosen, max(1, min(expert_bytes, int(0.4 * memory) - other_bytes))


def _check_bias(prefix: str, spec: SwitchSpec, has_bias: bool, where: str) -> None:
    if has_bias == spec.bias:
        return
    if spec.bias:
        raise ShapeMismatchError(
            f"{where}: routed experts of {prefix} have no bias tensors, but this architecture's "
            "experts carry one (has_expert_bias); the weights are incomplete or belong to "
            "another architecture"
        )
    raise ShapeMismatchError(
        f"{where}: routed experts of {prefix} carry bias tensors ({prefix}.*.bias), which this "
        "architecture's experts do not have (has_expert_bias is false); the weights belong to "
        "another architecture"
    )


def plan_experts(
    ckpt: Checkpoint,
    adapter: MoeArchAdapter,
    switches: Mapping[str, SwitchSpec],
    weights: dict[str, mx.array],
    where: Callable[[str], str],
    options: LoadOptions,
) -> ExpertPlan:
    """Decide the expert store; expert tensors are taken out of ``weights``. Reads no data.

    Raises a ``CheckpointError`` naming the file when the expert tensors do not match the
    model, the format or layout is one the adapter does not run, or the budget is too small.
    """
    sidecar = has_sidecar(ckpt.path)
    names = expert_names(switches)
    sources: dict[str, LayerSource] = read_sidecar(ckpt.path, switches) if sidecar else {}
    if sidecar:
        expert_bytes = sum(s.expert_bytes * s.spec.num_experts for s in sources.values())
    else:
        expert_bytes = sum(int(weights[n].nbytes) for n in names if n in weights)
    other = sum(int(v.nbytes) for k, v in weights.items() if k not in names)
    residency, budget = choose_residency(options, expert_bytes, other)
    if not switches:  # no routed experts (every layer dense): nothing to stream
        residency, budget = "resident", None
    if residency not in adapter.expert_stores:
        raise AdapterError(
            f"{adapter.name} supports the expert stores {', '.join(adapter.expert_stores)}, "
            f"not {residency}"
        )
    layout = "sidecar" if sidecar else adapter.classify_layout(ckpt.tensor_names).value
    if not sidecar and ExpertLayout(layout) not in adapter.layouts:
        raise CheckpointError(
            f"{ckpt.path}: {adapter.name} reads {', '.join(x.value for x in adapter.layouts)} "
            f"expert layouts, and this checkpoint's experts are {layout}; run `mach convert`"
        )
    if residency == "resident":
        plan = _plan_resident(switches, weights, where, sources, expert_bytes, str(ckpt.path))
    else:
        for name in names:
            weights.pop(name, None)
        if not sources:
            sources = _stream_sources(ckpt, adapter, switches)
        plan = _plan_streaming(residency, budget, sources, expert_bytes, str(ckpt.path),
                               options.slot_pool)  # fmt: skip
    plan.layout = layout
    if switches and format_family(plan.quantization) not in adapter.routed_quantization:
        raise CheckpointError(
            f"{ckpt.path}: routed experts are {plan.quantization}, which {adapter.name} does not "
            f"run (it runs {', '.join(adapter.routed_quantization)})"
        )
    return plan


def _plan_resident(
    switches: Mapping[str, SwitchSpec],
    weights: dict[str, mx.array],
    where: Callable[[str], str],
    sources: Mapping[str, LayerSource],
    expert_bytes: int,
    path: str,
) -> ExpertPlan:
    if sources:
        memory = sum(slot_bytes(s) * s.spec.num_experts for s in sources.values())
        for prefix, source in sources.items():
            _check_bias(prefix, source.spec, "down_proj.bias" in source.pieces, path)
        first = next(iter(sources.values()), None)
        quantization = _source_format(first) if first else "none"
        return ExpertPlan("resident", "sidecar", quantization, expert_bytes, memory,
                          sources=dict(sources))  # fmt: skip
    first_switch = next(iter(switches.items()), None)
    quantization = _weights_format(weights, *first_switch) if first_switch else "none"
    store = ResidentStackedExpertCache.from_weights(
        weights, switches, where, env_flag("MACH_FUSE_GATE_UP", True)
    )
    for prefix, spec in switches.items():
        matrices = store.layers[prefix].weights
        _check_bias(prefix, spec, matrices.down.bias is not None, where(f"{prefix}.down_proj"))
    return ExpertPlan("resident", "", quantization, expert_bytes, store.nbytes, resident=store)


def _plan_streaming(
    residency: Residency,
    budget: int | None,
    sources: dict[str, LayerSource],
    expert_bytes: int,
    path: str,
    slot_pool: SlotPoolMode = "layer",
) -> ExpertPlan:
    assert budget is not None
    first = next(iter(sources.values()), None)
    quantization = _source_format(first) if first else "none"
    float_dtype = None
    if residency == "bf16_streaming":
        if quantization not in FLOAT_FORMATS:
            raise CheckpointError(
                f"bf16_streaming holds float experts in bfloat16 banks, and these experts are "
                f"{quantization}; use expert_residency='streaming'"
            )
        float_dtype = mx.bfloat16
    for prefix, source in sources.items():
        _check_bias(prefix, source.spec, "down_proj.bias" in source.pieces, path)
    slots = check_budget(budget, sources, float_dtype, slot_pool)
    sizes = [slot_bytes(s, float_dtype) for s in sources.values()]
    if slot_pool == "shared":
        check_shared_pool(sources)
        per_slot = max(sizes, default=0)
        return ExpertPlan(residency, "", quantization, expert_bytes, per_slot * slots, budget,
                          0, per_slot, sources, slot_pool="shared", pool_slots=slots)  # fmt: skip
    memory = sum(size * min(slots, s.spec.num_experts)
                 for size, s in zip(sizes, sources.values(), strict=True))  # fmt: skip
    return ExpertPlan(residency, "", quantization, expert_bytes, memory, budget, slots,
                      sum(sizes), sources)  # fmt: skip


def build_store(
    plan: ExpertPlan, options: LoadOptions, ckpt: Checkpoint, adapter: MoeArchAdapter
) -> ExpertStore:
    """The store ``plan`` describes. Streaming allocates its banks; resident reads nothing yet."""
    if plan.resident is not None:
        return plan.resident
    if plan.residency == "resident":
        return _resident_from_sidecar(plan, options)
    if plan.layout == ExpertLayout.STACKED.value:
        warnings.warn(STACKED_GUARD, StackedStreamingWarning, stacklevel=4)
    assert plan.budget_bytes is not None
    float_dtype = mx.bfloat16 if plan.residency == "bf16_streaming" else None
    return BankCache(
        plan.sources,
        plan.budget_bytes,
        ExpertReader(verify=options.verify_experts),
        options.prefill,
        float_dtype,
        kind=plan.residency,
        slot_pool=plan.slot_pool,
    )


def _resident_from_sidecar(plan: ExpertPlan, options: LoadOptions) -> ExpertStore:
    weights: dict[str, mx.array] = {}
    reader = ExpertReader(verify=options.verify_experts)
    try:
        for prefix, source in plan.sources.items():
            raws = reader.read(source, list(range(source.spec.num_experts)))
            for name, piece in source.pieces.items():
                weights[f"{prefix}.{name}"] = mx.stack([piece.to_mx(r[name]) for r in raws])
    finally:
        reader.close()
    switches = {prefix: source.spec for prefix, source in plan.sources.items()}
    return ResidentStackedExpertCache.from_weights(
        weights, switches, str, env_flag("MACH_FUSE_GATE_UP", True)
    )
