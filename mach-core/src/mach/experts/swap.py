"""``_swap_switch_mlp``: bind every routed-expert block of a model to a store."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from mach.experts.dispatch import GatherSwitchGLU
from mach.experts.store import ExpertStore
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU


def find_switches(model: nn.Module) -> dict[str, SwitchSpec]:
    """Path -> spec of every unbound routed-expert block, in model order."""
    return {
        path: module.spec
        for path, module in model.named_modules()
        if isinstance(module, UnboundSwitchGLU)
    }


def _set_child(root: nn.Module, path: str, child: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node: Any = root
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    setattr(node, leaf, child)


def swap_switch_mlp(model: nn.Module, store: ExpertStore) -> list[GatherSwitchGLU]:
    """Replace each ``UnboundSwitchGLU`` with a ``GatherSwitchGLU`` bound to ``store``."""
    bound = []
    for path, spec in find_switches(model).items():
        module = GatherSwitchGLU(spec, store.layer(path))
        _set_child(model, path, module)
        bound.append(module)
    return bound
