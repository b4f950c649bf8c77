"""Helpers adapters compose in ``sanitize`` to bring routed experts to engine names.

Engine names for a layer's experts are ``<switch>.{gate_proj,up_proj,down_proj}.<part>`` with
arrays ``[experts, out, in]``, where ``<part>`` is ``weight``, ``scales``, ``biases`` or ``bias``.
"""

from __future__ import annotations

import re

import mlx.core as mx

PARTS = ("weight", "scales", "biases", "bias")


def stack_per_expert(
    weights: dict[str, mx.array], source: str, target: str, projections: dict[str, str]
) -> None:
    """Stack ``<source>.<e>.<proj>.<part>`` over experts into ``<target>.<engine proj>.<part>``.

    ``projections`` maps the checkpoint's projection names to engine names (e.g.
    ``{"w1": "gate_proj"}``). Expert ids must run 0..E-1 with none missing.
    """
    pattern = re.compile(re.escape(source) + r"\.(\d+)\.([^.]+)\.([^.]+)$")
    found: dict[tuple[str, str], dict[int, mx.array]] = {}
    for name in [n for n in weights if n.startswith(source + ".")]:
        match = pattern.match(name)
        if match is None or match.group(2) not in projections:
            continue
        expert, proj, part = int(match.group(1)), match.group(2), match.group(3)
        found.setdefault((proj, part), {})[expert] = weights.pop(name)
    for (proj, part), by_expert in found.items():
        count = max(by_expert) + 1
        missing = sorted(set(range(count)) - set(by_expert))
        if missing:
            raise KeyError(
                f"{source}: expert(s) {missing[:8]} have no {proj}.{part}; the checkpoint is "
                "incomplete"
            )
        stacked = mx.stack([by_expert[e] for e in range(count)])
        weights[f"{target}.{projections[proj]}.{part}"] = stacked


def split_gate_up(weights: dict[str, mx.array], name: str, target: str, axis: int = -2) -> None:
    """Split a fused ``gate_up`` tensor (gate half first) into engine gate and up tensors."""
    fused = weights.pop(name)
    gate, up = mx.split(fused, 2, axis=axis)
    part = "bias" if name.endswith("bias") else "weight"
    weights[f"{target}.gate_proj.{part}"] = gate
    weights[f"{target}.up_proj.{part}"] = up


def rename(
    weights: dict[str, mx.array],
    prefixes: tuple[tuple[str, str], ...] = (),
    dropped: tuple[str, ...] = (),
) -> dict[str, mx.array]:
    """Weights with the first matching ``(old, new)`` prefix replaced and ``dropped`` prefixes
    (vision towers, MTP heads) and rotary caches left out; arrays stay lazy."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.startswith(dropped) or "rotary_emb" in name:
            continue
        for old, new in prefixes:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = value
    return out
