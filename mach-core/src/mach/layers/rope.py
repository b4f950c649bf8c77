"""Rotary position embeddings from either config dialect (``rope_theta`` or ``rope_parameters``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
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


class YarnRoPE(nn.Module):
    """YaRN: frequencies blended between interpolation and extrapolation, outputs scaled.

    Follows the reference formula, including ``truncate: false`` (an unrounded correction
    range, as gpt-oss configures it). The attention factor scales both queries and keys.
    """

    def __init__(self, dims: int, theta: float, scaling: Mapping[str, Any],
                 traditional: bool = False) -> None:  # fmt: skip
        super().__init__()  # type: ignore[no-untyped-call]
        factor = float(scaling["factor"])
        original = float(scaling["original_max_position_embeddings"])
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)
        truncate = bool(scaling.get("truncate", True))

        def correction(rotations: float) -> float:
            return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction(beta_fast), correction(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001
        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp
        periods = theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        inv_freq = (1 / (factor * periods)) * (1 - extrapolate) + (1 / periods) * extrapolate
        self._freqs = 1 / inv_freq
        attention = scaling.get("attention_factor")
        self.mscale = float(attention) if attention else (
            0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)  # fmt: skip
        self.dims, self.traditional = dims, traditional

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.mscale != 1.0:
            x = x * self.mscale
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)  # fmt: skip


def make_rope(dims: int, config: Mapping[str, Any], traditional: bool = False) -> nn.Module:
    """The rotary embedding a config asks for, over the first ``dims`` features of a head."""
    theta, scaling = rope_settings(config)
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind == "default":
        return nn.RoPE(dims, traditional=traditional, base=theta)
    if kind == "linear":
        return nn.RoPE(dims, traditional=traditional, base=theta, scale=1 / scaling["factor"])
    if kind == "yarn":
        return YarnRoPE(dims, theta, scaling, traditional)
    raise AdapterError(
        f"rope type {kind!r} is not supported yet (supported: default, linear, yarn); "
        "check rope_parameters / rope_scaling in config.json"
    )
