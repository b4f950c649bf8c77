"""``convert``: write a checkpoint in mach's engine format (sidecar experts), maybe quantized."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mach.adapter import MoeArchAdapter
from mach.experts.sidecar import write_index, write_layer
from mach.experts.sources import PARTS, PROJECTIONS
from mach.experts.switch import SwitchSpec
from mach.io.checkpoint import Checkpoint, open_checkpoint
from mach.io.paths import resolve_model_path
from mach.io.plan import check_shapes, read_model
from mach.io.quant import quantize_modules
from mach.registry import detect_arch

COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "README.md",
)
_NAMES = {mx.uint32: "U32", mx.uint8: "U8", mx.float32: "F32", mx.float16: "F16",
          mx.bfloat16: "BF16"}  # fmt: skip
ROUTER_BITS = 8


def _to_numpy(array: mx.array) -> tuple[np.ndarray, str]:
    name = _NAMES.get(array.dtype)
    if name is None:
        raise ValueError(f"cannot store {array.dtype} expert tensors")
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)), name
    return np.array(array), name


def _layer_number(prefix: str, fallback: int) -> int:
    match = re.search(r"\.(\d+)\.", prefix)
    return int(match.group(1)) if match else fallback


def _expert_parts(
    weights: dict[str, mx.array], prefix: str, spec: SwitchSpec, bits: int | None, group: int
) -> dict[str, mx.array]:
    parts: dict[str, mx.array] = {}
    for proj in PROJECTIONS:
        found = {p: weights.pop(f"{prefix}.{proj}.{p}") for p in PARTS
                 if f"{prefix}.{proj}.{p}" in weights}  # fmt: skip
        if "weight" not in found:
            raise ValueError(f"{prefix}.{proj}.weight is missing from the source checkpoint")
        if bits is not None:
            weight = found["weight"]
            if "scales" in found:
                in_dims = spec.input_dims if proj != "down_proj" else spec.hidden_dims
                src_bits = weight.shape[-1] * 32 // in_dims
                src_group = in_dims // found["scales"].shape[-1]
                weight = mx.dequantize(weight, found.pop("scales"), found.pop("biases", None),
                                       group_size=src_group, bits=src_bits)  # fmt: skip
            q, scales, biases = mx.quantize(weight, group_size=group, bits=bits)
            found.update(weight=q, scales=scales, biases=biases)
        for part, value in found.items():
            parts[f"{proj}.{part}"] = value
    return parts


def _quantize_rest(
    model: nn.Module,
    switches: dict[str, SwitchSpec],
    bits: int,
    group: int,
    adapter: MoeArchAdapter,
) -> None:
    routers = set()
    for prefix, spec in switches.items():
        parent = prefix.rsplit(".", 1)[0]
        for path, module in model.named_modules():
            if (path.startswith(parent + ".") and isinstance(module, nn.Linear)
                    and module.weight.shape[0] == spec.num_experts):  # fmt: skip
                routers.add(path)

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not isinstance(module, (nn.Linear, nn.Embedding)) or not adapter.quantizable(path):
            return False
        if module.weight.shape[-1] % group:
            return False
        if path in routers:
            return {"group_size": group, "bits": ROUTER_BITS}
        return True

    nn.quantize(model, group_size=group, bits=bits, class_predicate=predicate)


def _check_quantizable(
    adapter: MoeArchAdapter, switches: dict[str, SwitchSpec], bits: int, group: int
) -> None:
    """Refuse, before writing anything, a conversion the family or the expert shapes rule out."""
    if f"affine{bits}" not in adapter.routed_quantization:
        raise ValueError(
            f"{adapter.name} does not run {bits}-bit affine experts (it runs "
            f"{', '.join(adapter.routed_quantization)}); convert without --bits"
        )
    for prefix, spec in switches.items():
        for name, size in (("input", spec.input_dims), ("intermediate", spec.hidden_dims)):
            if size % group:
                fits = [g for g in (128, 64, 32) if size % g == 0 and spec.input_dims % g == 0
                        and spec.hidden_dims % g == 0]  # fmt: skip
                hint = f"use --group-size {fits[0]}" if fits else "convert without --bits"
                raise ValueError(
                    f"{prefix}: the experts' {name} size {size} is not a multiple of the group "
                    f"size {group}, so they cannot be quantized; {hint}"
                )


def _quantization_block(model: nn.Module) -> dict[str, Any] | None:
    found = {path: (m.group_size, m.bits, getattr(m, "mode", "affine"))
             for path, m in model.named_modules() if hasattr(m, "bits")}  # fmt: skip
    if not found:
        return None
    counts: dict[tuple[int, int, str], int] = {}
    for setting in found.values():
        counts[setting] = counts.get(setting, 0) + 1
    group, bits, mode = max(counts, key=lambda s: counts[s])
    block: dict[str, Any] = {"group_size": group, "bits": bits, "mode": mode}
    for path, (g, b, m) in found.items():
        if (g, b, m) != (group, bits, mode):
            block[path] = {"group_size": g, "bits": b, "mode": m}
    return block


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    bits: int | None = None,
    group_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``source`` (any layout its adapter reads) to ``target`` in the engine format.

    Routed experts go to ``expert_sidecar/`` (one record per expert), everything else to
    ``model.safetensors``. ``bits`` (4 or 8) quantizes experts and every other matrix whose input
    size is a multiple of ``group_size`` (routers at 8 bits), as mlx-community checkpoints are.
    The result is written next to ``target`` and renamed into place only when complete.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group size must be 32, 64 or 128, got {group_size}")
    target = Path(target).expanduser()
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose a new folder or remove it first")
    ckpt = open_checkpoint(resolve_model_path(source))
    adapter = detect_arch(ckpt.config, ckpt.tensor_names)
    model, switches, weights, _ = read_model(ckpt, adapter)
    if bits is not None:
        _check_quantizable(adapter, switches, bits, group_size)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(ckpt, adapter, model, weights, switches, tmp, bits, group_size, progress)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write(
    ckpt: Checkpoint,
    adapter: MoeArchAdapter,
    model: nn.Module,
    weights: dict[str, mx.array],
    switches: dict[str, SwitchSpec],
    out: Path,
    bits: int | None,
    group: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    total = sum(info.nbytes for info in ckpt.tensors.values())
    done = 0
    layers: dict[str, Any] = {}
    for i, (prefix, spec) in enumerate(switches.items()):
        parts = _expert_parts(weights, prefix, spec, bits, group)
        arrays, dtypes = {}, {}
        for name, value in parts.items():
            arrays[name], dtypes[name] = _to_numpy(value)
        layers[prefix] = write_layer(out, prefix, _layer_number(prefix, i), arrays, dtypes)
        done += sum(a.nbytes for a in arrays.values())
        if progress is not None:
            progress(min(done, total), total)
    write_index(out, layers)
    quantize_modules(model, ckpt.config, weights)
    check_shapes(model, weights, ckpt.path, lambda _: str(ckpt.path))
    model.load_weights(list(weights.items()), strict=True)
    if bits is not None:
        _quantize_rest(model, switches, bits, group, adapter)
    params = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), params, metadata={"format": "mlx"})
    config = dict(ckpt.config)
    config.pop("quantization_config", None)
    block = _quantization_block(model)
    if block is not None:
        config["quantization"] = block
    else:
        config.pop("quantization", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED:
        if (ckpt.path / name).is_file():
            shutil.copy(ckpt.path / name, out / name)
    if progress is not None:
        progress(total, total)
