"""``_swap_switch_mlp``: bind every routed-expert block of a model to a store."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from mach.env import env_flag
from mach.experts.dispatch import DiskSwitchGLU, GatherSwitchGLU
from mach.experts.store import ExpertStore
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU


def find_switches(model: nn.Module) -> dict[str, SwitchSpec]:
    """Path -> spec of every unbound routed-expert block, in model order."""
    return {
        path: module.spec
        for path, module in model.named_modules()
        if isinstance(module, UnboundSwitchGLU)
    }


def set_child(root: nn.Module, path: str, child: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node: Any = root
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    setattr(node, leaf, child)


GATHER_ENV = "LME_USE_GATHER_DISPATCH"


def gather_dispatch_enabled() -> bool:
    """``LME_USE_GATHER_DISPATCH`` (default on); ``0`` selects the legacy per-expert loop."""
    return env_flag(GATHER_ENV, True)


def swap_switch_mlp(
    model: nn.Module, store: ExpertStore, gather: bool | None = None
) -> list[GatherSwitchGLU | DiskSwitchGLU]:
    """Replace each ``UnboundSwitchGLU`` with a dispatch module bound to ``store``.

    ``GatherSwitchGLU`` by default; ``DiskSwitchGLU`` when ``gather`` is false (or, when
    ``gather`` is ``None``, when ``LME_USE_GATHER_DISPATCH=0``).
    """
    use_gather = gather_dispatch_enabled() if gather is None else gather
    kind = GatherSwitchGLU if use_gather else DiskSwitchGLU
    bound: list[GatherSwitchGLU | DiskSwitchGLU] = []
    for path, spec in find_switches(model).items():
        module = kind(spec, store.layer(path))
        set_child(model, path, module)
        bound.append(module)
    return bound
