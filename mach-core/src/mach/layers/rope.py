"""Rotary position embeddings from either config dialect (``rope_theta`` or ``rope_parameters``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.nn as nn

from mach.errors import AdapterError


def rope_settings(config: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """``(theta, scaling)`` from a config, whichever dialect wrote it."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        return float(theta), dict(params)
    scaling = config.get("rope_scaling")
    return float(config.get("rope_theta", 10000.0)), dict(scaling or {})


def make_rope(dims: int, config: Mapping[str, Any], traditional: bool = False) -> nn.Module:
    """The rotary embedding a config asks for, over the first ``dims`` features of a head."""
    theta, scaling = rope_settings(config)
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind == "default":
        return nn.RoPE(dims, traditional=traditional, base=theta)
    if kind == "linear":
        return nn.RoPE(dims, traditional=traditional, base=theta, scale=1 / scaling["factor"])
    raise AdapterError(
        f"rope type {kind!r} is not supported yet (supported: default, linear); "
        "check rope_parameters / rope_scaling in config.json"
    )
