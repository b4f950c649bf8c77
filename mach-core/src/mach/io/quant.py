"""Quantized non-expert modules as mlx-community checkpoints describe them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    model: nn.Module, config: Mapping[str, Any], weight_names: frozenset[str]
) -> None:
    """Swap each Linear/Embedding the checkpoint stores quantized for its quantized form.

    A module is quantized when ``<path>.scales`` is among the weights; a per-path entry in the
    quantization block (``{"bits": 8, "group_size": 64}`` or ``false``) overrides the defaults.
    """
    block = quantization_config(config)
    if block is None:
        if any(name.endswith(".scales") for name in weight_names):
            # Quantized tensors but no block: the defaults every mlx-community model uses.
            block = {"group_size": 64, "bits": 4}
        else:
            return
    defaults = {
        "group_size": int(block.get("group_size", 64)),
        "bits": int(block.get("bits", 4)),
        "mode": str(block.get("mode", "affine")),
    }

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        if f"{path}.scales" not in weight_names:
            return False
        override = block.get(path)
        if override is False:
            return False
        if isinstance(override, Mapping):
            return {**defaults, **{k: override[k] for k in defaults if k in override}}
        return dict(defaults)

    nn.quantize(model, class_predicate=predicate)
