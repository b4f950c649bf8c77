"""``check_checkpoint``: what a checkpoint can run, predicted from headers alone.

It reads ``config.json``, tokenizer files and safetensors / sidecar headers, never tensor data,
and reuses the loader's own pieces (``detect_arch``, the adapter's sanitize on lazy arrays,
layout and quantization inspection, the streaming sources), so its answers match what loading
does.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mach.adapter import MoeArchAdapter
from mach.errors import MachError
from mach.registry import KNOWN_FAMILIES, arch_summary, detect_arch, install_hint

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
    residency: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_per_token_cold: int = 0
    ssd_gbps: float = DEFAULT_SSD_GBPS
    decode_bound_cold_tps: float = 0.0
    continuous_batching: bool | None = None
    prefix_reuse: bool | None = None
    specdec_kind: str | None = None
    draft_present: bool = False
    tokenizer: bool = False
    chat_template: bool = False
    tool_calls: bool = False
    context_length: int | None = None
    serving: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantization(parts: dict[str, Any], input_dims: int) -> str:
    """``float32``/``bfloat16``/... or ``affine4``/``affine8``/``mxfp4`` from a gate's tensors."""
    import mlx.core as mx

    weight, scales = parts.get("weight"), parts.get("scales")
    if weight is None:
        return "unknown"
    if scales is None:
        return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(
            weight.dtype, str(weight.dtype)
        )
    if "biases" not in parts:
        return "mxfp4"
    return f"affine{weight.shape[-1] * 32 // input_dims}"


def check_checkpoint(
    path: str | os.PathLike[str],
    expert_budget: int | str | None = None,
    ssd_gbps: float = DEFAULT_SSD_GBPS,
) -> CheckReport:
    """Predict, without reading tensor data, how ``path`` loads and runs."""
    from mach.errors import UnknownArchitectureError
    from mach.io.checkpoint import open_checkpoint
    from mach.io.load import resolve_model_path

    report = CheckReport(str(path), ssd_gbps=ssd_gbps)
    try:
        ckpt = open_checkpoint(resolve_model_path(path))
        adapter = detect_arch(ckpt.config, ckpt.tensor_names)
    except UnknownArchitectureError as exc:
        report.diagnosis = str(exc)
        model_type = str(_config_value(path, "model_type") or "")
        family = KNOWN_FAMILIES.get(model_type)
        if family:
            report.warnings.append(f"install the family: {install_hint(family)}")
        return report
    except (MachError, OSError) as exc:
        report.diagnosis = str(exc)
        return report
    try:
        _fill(report, ckpt, adapter, expert_budget)
    except (MachError, ValueError, KeyError) as exc:
        report.loads = False
        report.diagnosis = str(exc)
    return report


def _config_value(path: str | os.PathLike[str], key: str) -> Any:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text()).get(key)
    except (OSError, ValueError):
        return None


def _fill(
    report: CheckReport, ckpt: Any, adapter: MoeArchAdapter, budget: int | str | None
) -> None:
    from mach.experts.bank import _slot_bytes, parse_size
    from mach.experts.sidecar import has_sidecar, read_sidecar
    from mach.experts.sources import PARTS, PROJECTIONS, stacked_source
    from mach.experts.swap import find_switches
    from mach.io.load import _read_weights
    from mach.io.residency import physical_memory
    from mach.tokenizer.tokenizer import load_tokenizer

    config = ckpt.config
    report.arch = adapter.name
    report.arch_summary = arch_summary(adapter)
    model = adapter.build_model(config)
    switches = find_switches(model)
    weights, _ = _read_weights(ckpt)
    weights = adapter.sanitize(weights, config)
    expert_names = {
        f"{p}.{proj}.{part}" for p in switches for proj in PROJECTIONS for part in PARTS
    }
    sidecar = has_sidecar(ckpt.path)
    if sidecar:
        sources = read_sidecar(ckpt.path, switches)
        report.layout = "sidecar"
        report.expert_bytes = sum(s.expert_bytes * s.spec.num_experts for s in sources.values())
    else:
        report.layout = adapter.classify_layout(ckpt.tensor_names).value
        report.expert_bytes = sum(int(weights[n].nbytes) for n in expert_names if n in weights)
        sources = {}
        for prefix, spec in switches.items():
            source = stacked_source(
                prefix, spec, ckpt.tensors, adapter.per_expert_name, adapter.stacked_names
            )
            if source is None:
                sources = {}
                break
            sources[prefix] = source
    report.non_expert_bytes = sum(
        int(v.nbytes) for k, v in weights.items() if k not in expert_names
    )
    report.total_bytes = report.expert_bytes + report.non_expert_bytes
    report.moe_layers = len(switches)
    if switches:
        spec = next(iter(switches.values()))
        report.experts_per_layer, report.top_k = spec.num_experts, spec.top_k
    if switches:
        prefix, spec = next(iter(switches.items()))
        if sidecar:
            import mlx.core as mx

            from mach.experts.sources import DTYPES

            pieces = sources[prefix].pieces
            # Lazy zeros carry dtype and shape without allocating anything.
            gate = {n.split(".")[1]: mx.zeros(pieces[n].shape, DTYPES[pieces[n].dtype][1])
                    for n in pieces if n.startswith("gate_proj.")}  # fmt: skip
        else:
            gate = {part: weights[f"{prefix}.gate_proj.{part}"] for part in PARTS
                    if f"{prefix}.gate_proj.{part}" in weights}  # fmt: skip
        report.routed_quantization = _quantization(gate, spec.input_dims)
        per_expert = report.expert_bytes // max(1, report.moe_layers * spec.num_experts)
        report.bytes_per_token_cold = per_expert * report.top_k * report.moe_layers
        if report.bytes_per_token_cold:
            report.decode_bound_cold_tps = report.ssd_gbps * 1e9 / report.bytes_per_token_cold
    memory = physical_memory()
    report.residency["resident"] = {
        "available": True,
        "memory_bytes": report.total_bytes,
        "fits_in_memory": not memory or report.total_bytes <= 0.8 * memory,
    }
    if sources:
        slot = sum(_slot_bytes(s) for s in sources.values())
        minimum = slot * max(1, report.top_k)
        chosen = (
            parse_size(budget) if budget is not None else max(minimum, report.expert_bytes // 4)
        )
        one_layer = max((s.expert_bytes * s.spec.num_experts for s in sources.values()), default=0)
        report.residency["streaming"] = {
            "available": True,
            "budget_bytes": chosen,
            "minimum_budget_bytes": minimum,
            "budget_ok": chosen >= minimum,
            "memory_bytes": report.non_expert_bytes + chosen + one_layer,
            "reads": "one record per expert" if sidecar else "per-expert slices at file offsets",
        }
        float_experts = report.routed_quantization in ("float32", "float16", "bfloat16")
        report.residency["bf16_streaming"] = {"available": float_experts and not sidecar}
    else:
        report.residency["streaming"] = {
            "available": False,
            "reason": "experts are stored in a form not readable one by one; run `mach convert`",
        }
    kind = adapter.kv_cache_kind
    report.continuous_batching = {"standard": True, "hybrid_gdn": True, "compressed": False}.get(
        kind
    )
    report.prefix_reuse = {"standard": True, "hybrid_gdn": True, "compressed": True}.get(kind)
    report.specdec_kind = adapter.specdec_kind
    report.draft_present = (
        any(n.startswith("mtp.") for n in ckpt.tensor_names)
        or (ckpt.path / "draft" / "config.json").is_file()
    )
    tokenizer = load_tokenizer(ckpt.path, config)
    report.tokenizer = tokenizer is not None
    report.chat_template = tokenizer is not None and tokenizer.chat_template is not None
    report.tool_calls = tokenizer is not None and tokenizer.token_id("<tool_call>") is not None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    context = config.get("max_position_embeddings") or (text or {}).get("max_position_embeddings")
    report.context_length = int(context) if context else None
    report.serving = {
        "completions": report.tokenizer,
        "chat_completions": report.chat_template,
        "tools": report.chat_template and report.tool_calls,
    }
    if not report.tokenizer:
        report.warnings.append(
            "no tokenizer.json: loads for token-id use only; mach generate and mach serve need it"
        )
    report.loads = True
    report.diagnosis = "ok"
