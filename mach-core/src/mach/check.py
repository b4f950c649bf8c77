"""``check_checkpoint``: what a checkpoint can run, from the loader's own plan.

It runs every planning step of a load (open, detect, build, classify, plan the expert store,
check names and shapes against the model) and stops before tensor data is read, so its verdict
and its byte figures are the ones loading reaches with the same options.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from mach.decode.dflash.config import draft_folder
from mach.errors import MachError, UnknownArchitectureError
from mach.experts.dispatch import dispatch_paths
from mach.experts.parallel import ExpertShard, expert_shard
from mach.io.options import LoadOptions
from mach.io.residency import format_family
from mach.registry import KNOWN_FAMILIES, arch_summary, install_hint

if TYPE_CHECKING:
    from mach.io.plan import LoadPlan

DEFAULT_SSD_GBPS = 5.0


@dataclass
class CheckReport:
    """The prediction for one checkpoint path."""

    path: str
    loads: bool = False
    diagnosis: str = ""
    arch: str | None = None
    arch_summary: dict[str, Any] | None = None
    layout: str | None = None
    routed_quantization: str | None = None
    moe_layers: int = 0
    experts_per_layer: int = 0
    top_k: int = 0
    total_bytes: int = 0
    expert_bytes: int = 0
    non_expert_bytes: int = 0
    store: dict[str, Any] = field(default_factory=dict)
    """What loading with these options builds: residency, budget, slots, memory."""
    residency: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each residency's figures (or why it is unavailable), whichever the options pick."""
    bytes_per_token_cold: int = 0
    ssd_gbps: float = DEFAULT_SSD_GBPS
    decode_bound_cold_tps: float = 0.0
    continuous_batching: bool | None = None
    """Whether sequences decode in batches, from the model's own caches."""
    sequential_reason: str | None = None
    """Why sequences decode one at a time, when they do."""
    prefix_reuse: bool | None = None
    specdec_kind: str | None = None
    draft_present: bool = False
    tokenizer: bool = False
    chat_template: bool = False
    tool_calls: bool = False
    context_length: int | None = None
    serving: dict[str, bool] = field(default_factory=dict)
    dispatch: dict[str, str] = field(default_factory=dict)
    """The expert kernels this device runs, for decode steps and prefill chunks."""
    parallel: dict[str, Any] = field(default_factory=lambda: {"ranks": 1})
    """The layout under ``mlx.launch``: ``ranks``, and with more than one the ``mode``; for
    ``expert`` the most experts of a layer one rank holds and the most expert bytes one rank
    keeps, for ``pipeline`` each rank's ``[first, end)`` layers and the most weight bytes one
    rank keeps."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_checkpoint(
    path: str | os.PathLike[str],
    options: LoadOptions | None = None,
    ssd_gbps: float = DEFAULT_SSD_GBPS,
) -> CheckReport:
    """Predict, without reading tensor data, how ``path`` loads with ``options`` and runs.

    Never raises for a bad checkpoint: the report says ``loads=False`` with the error loading
    would raise.
    """
    from mach.io.plan import plan_load

    options = options or LoadOptions()
    report = CheckReport(str(path), ssd_gbps=ssd_gbps)
    try:
        plan = plan_load(path, options)
    except UnknownArchitectureError as exc:
        report.diagnosis = str(exc)
        family = KNOWN_FAMILIES.get(_model_type(path))
        if family:
            report.warnings.append(f"install the family: {install_hint(family)}")
        return report
    except (MachError, OSError, ValueError) as exc:
        report.diagnosis = str(exc)
        return report
    fill_report(report, plan)
    report.residency = _alternatives(path, plan)
    return report


def _model_type(path: str | os.PathLike[str]) -> str:
    from mach.io.checkpoint import open_checkpoint
    from mach.io.paths import resolve_model_path

    try:
        config = open_checkpoint(resolve_model_path(path)).config
    except (MachError, OSError):
        return ""
    return str(config.get("model_type") or "")


def _store_figures(plan: LoadPlan) -> dict[str, Any]:
    experts = plan.experts
    figures: dict[str, Any] = {
        "available": True,
        "residency": experts.residency,
        "memory_bytes": plan.memory_bytes,
        "expert_memory_bytes": experts.memory_bytes,
    }
    if experts.streaming:
        top_k = max((s.top_k for s in plan.switches.values()), default=1)
        one_layer = max((s.expert_bytes * s.spec.num_experts for s in experts.sources.values()),
                        default=0)  # fmt: skip
        figures.update(
            budget_bytes=experts.budget_bytes,
            minimum_budget_bytes=experts.slot_bytes * top_k,
            slot_pool=experts.slot_pool,
            slots_per_layer=experts.slots_per_layer,
            pool_slots=experts.pool_slots,
            transient_prefill_bytes=one_layer if plan.options.prefill == "transient" else 0,
            reads="one record per expert" if experts.layout == "sidecar"
            else "per-expert slices at file offsets",
        )  # fmt: skip
    return figures


def _alternatives(path: str | os.PathLike[str], plan: LoadPlan) -> dict[str, dict[str, Any]]:
    """The figures of each residency: the chosen one from ``plan``, the others planned anew."""
    from mach.io.plan import plan_load
    from mach.io.residency import physical_memory

    base = replace(plan.options, streaming=None, expert_residency=None)
    wanted = {
        "resident": replace(base, expert_budget=None, streaming=False, slot_pool="layer"),
        "streaming": replace(base, expert_residency="streaming"),
        "bf16_streaming": replace(base, expert_residency="bf16_streaming"),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, options in wanted.items():
        if name == plan.experts.residency:
            out[name] = _store_figures(plan)
            continue
        try:
            out[name] = _store_figures(plan_load(plan.checkpoint, options))
        except (MachError, ValueError) as exc:
            out[name] = {"available": False, "reason": str(exc)}
    resident = out["resident"]
    if resident["available"]:
        memory = physical_memory()
        resident["fits_in_memory"] = not memory or resident["memory_bytes"] <= 0.8 * memory
    return out


def _batching(plan: LoadPlan, summary: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether the model's caches batch (a rotating window is checked on the caches the
    family builds), and why not."""
    from mach.cache.batch import batch_support

    reason = batch_support(plan.adapter.make_cache(plan.model))
    if summary["continuous_batching"] is False and reason is None:
        reason = f"a {summary['kv_cache_kind']} cache cannot batch"
    return reason is None, None if reason is None else f"{plan.adapter.name}: {reason}"


def _pipeline(plan: LoadPlan, ranks: int) -> dict[str, Any]:
    """How ``ranks`` pipeline stages split the layers, and the most bytes one of them keeps."""
    from mach.layers.pipeline import PipelineStage

    layers = plan.model.layers
    paths = {id(m): path for path, m in plan.model.named_modules()}
    prefixes = [f"{paths[id(layer)]}." for layer in layers]
    per_layer = [0] * len(layers)
    shared = 0
    for name, array in plan.weights.items():
        at = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        shared += int(array.nbytes) if at is None else 0
        if at is not None:
            per_layer[at] += int(array.nbytes)
    experts_total = max(1, sum(s.num_experts for s in plan.switches.values()))
    for prefix, spec in plan.switches.items():
        at = next(i for i, p in enumerate(prefixes) if f"{prefix}.".startswith(p))
        per_layer[at] += plan.experts.expert_bytes * spec.num_experts // experts_total
    spans = [PipelineStage(r, ranks).layers(len(layers)) for r in range(ranks)]
    return {"ranks": ranks, "mode": "pipeline", "layers": [list(s) for s in spans],
            "bytes_per_rank": shared + max(sum(per_layer[lo:hi]) for lo, hi in spans)}  # fmt: skip


def _parallel(plan: LoadPlan) -> dict[str, Any]:
    """How the ranks of this ``mlx.launch`` (if any) split the model."""
    shard = expert_shard()
    if shard is None:
        return {"ranks": 1}
    if plan.options.parallel == "pipeline":
        return _pipeline(plan, shard.size)
    spans = [
        [ExpertShard(r, shard.size).span(s.num_experts) for s in plan.switches.values()]
        for r in range(shard.size)
    ]
    held = [sum(hi - lo for lo, hi in rank) for rank in spans]
    experts_total = max(1, sum(s.num_experts for s in plan.switches.values()))
    return {
        "ranks": shard.size,
        "mode": "expert",
        "experts_per_layer_per_rank": max((hi - lo for rank in spans for lo, hi in rank),
                                          default=0),
        "expert_bytes_per_rank": plan.experts.expert_bytes * max(held) // experts_total,
    }  # fmt: skip


def fill_report(report: CheckReport, plan: LoadPlan) -> None:
    """Everything the report says, taken from a load plan (or a loaded model's plan)."""
    ckpt, adapter, experts = plan.checkpoint, plan.adapter, plan.experts
    summary = arch_summary(adapter)
    report.arch = adapter.name
    report.arch_summary = summary
    report.layout = experts.layout
    report.routed_quantization = experts.quantization
    report.moe_layers = len(plan.switches)
    if plan.switches:
        spec = next(iter(plan.switches.values()))
        report.experts_per_layer, report.top_k = spec.num_experts, spec.top_k
        quantized = format_family(experts.quantization) != "float"
        report.dispatch = dispatch_paths(spec.num_experts, quantized)
    report.expert_bytes = experts.expert_bytes
    report.non_expert_bytes = plan.non_expert_bytes
    report.total_bytes = report.expert_bytes + report.non_expert_bytes
    report.store = _store_figures(plan)
    experts_total = sum(s.num_experts for s in plan.switches.values())
    if experts_total:
        per_expert = report.expert_bytes // experts_total
        report.bytes_per_token_cold = per_expert * sum(s.top_k for s in plan.switches.values())
        report.decode_bound_cold_tps = report.ssd_gbps * 1e9 / max(1, report.bytes_per_token_cold)
    report.parallel = _parallel(plan)
    report.continuous_batching, report.sequential_reason = _batching(plan, summary)
    report.prefix_reuse = summary["prefix_reuse"]
    report.specdec_kind = adapter.specdec_kind
    report.draft_present = any(n.startswith("mtp.") for n in ckpt.tensor_names) or (
        adapter.specdec_kind == "specdec_v7"
        and draft_folder(ckpt.path, plan.options.draft_path) is not None
    )
    tokenizer = plan.tokenizer
    report.tokenizer = tokenizer is not None
    report.chat_template = tokenizer is not None and tokenizer.chat_template is not None
    report.tool_calls = tokenizer is not None and tokenizer.token_id("<tool_call>") is not None
    report.context_length = ckpt.context_length
    report.serving = {
        "completions": report.tokenizer,
        "chat_completions": report.chat_template,
        "tools": report.chat_template and report.tool_calls,
        "structured_output": report.tokenizer and find_spec("llguidance") is not None,
    }
    if not report.tokenizer:
        report.warnings.append(
            "no tokenizer.json: loads for token-id use only; mach generate and mach serve need it"
        )
    report.loads = True
    report.diagnosis = "ok"
