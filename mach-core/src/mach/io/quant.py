"""Quantized non-expert modules as mlx-community checkpoints describe them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mach.errors import CheckpointError


def quantization_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The mlx-style ``quantization`` block (``group_size``, ``bits``, ``mode``, per-path keys)."""
    block = config.get("quantization")
    if block is None:
        qc = config.get("quantization_config")
        if isinstance(qc, Mapping) and "bits" in qc and "quant_method" not in qc:
            block = qc
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise CheckpointError(f"config.json 'quantization' must be an object, got {block!r}")
    return dict(block)


def quantize_modules(
    model: nn.Module, config: Mapping[str, Any], weights: Mapping[str, mx.array]
) -> None:
    """Swap each Linear/Embedding the checkpoint stores quantized for its quantized form.

    A module is quantized when ``<path>.scales`` is among the weights. Bits and group size are
    read from the packed shapes themselves, so per-module overrides (8-bit routers) hold whatever
    names the checkpoint's config uses; the config's ``mode`` (affine, mxfp4, ...) applies.
    """
    block = quantization_config(config) or {}
    mode = str(block.get("mode", "affine"))

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        scales = weights.get(f"{path}.scales")
        if not hasattr(module, "to_quantized") or scales is None:
            return False
        packed = weights[f"{path}.weight"]
        in_dims = int(module.weight.shape[-1])
        bits = packed.shape[-1] * 32 // in_dims
        group = in_dims // scales.shape[-1]
        if bits * in_dims != packed.shape[-1] * 32 or group * scales.shape[-1] != in_dims:
            raise CheckpointError(
                f"{path}: packed weight {list(packed.shape)} and scales {list(scales.shape)} do "
                f"not describe a quantization of input size {in_dims}"
            )
        kind = mode if f"{path}.biases" not in weights else "affine"
        return {"group_size": group, "bits": bits, "mode": kind}

    nn.quantize(model, class_predicate=predicate)
