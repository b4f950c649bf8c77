"""``_swap_switch_mlp``: bind every routed-expert block of a model to a store."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import mlx.nn as nn

from mach.env import env_flag
from mach.errors import AdapterError
from mach.experts.activations import GateActivation
from mach.experts.dispatch import DiskSwitchGLU, GatherSwitchGLU
from mach.experts.parallel import ExpertShard, ShardedSwitch
from mach.experts.store import ExpertStore, ResidentStackedExpertCache
from mach.experts.switch import SwitchSpec, UnboundSwitchGLU


def find_switches(model: nn.Module) -> dict[str, SwitchSpec]:
    """Path -> spec of every unbound routed-expert block, in model order."""
    return {
        path: module.spec
        for path, module in model.named_modules()
        if isinstance(module, UnboundSwitchGLU)
    }


def bind_switches(
    model: nn.Module, activation: GateActivation, bias: bool, owner: str
) -> dict[str, SwitchSpec]:
    """Give every routed-expert block the activation and bias its adapter declares.

    A block the model built with an explicit activation or bias must agree with the adapter,
    so the capability fields reported for an architecture are the ones that run.
    """
    bound: dict[str, SwitchSpec] = {}
    for path, module in model.named_modules():
        if not isinstance(module, UnboundSwitchGLU):
            continue
        spec = module.spec
        if spec.activation is not None and spec.activation != activation:
            raise AdapterError(
                f"{owner}: the model builds {path} with {spec.activation}, but the adapter "
                f"declares {activation}; make swiglu_variant / gate_activation match the model"
            )
        if spec.bias is not None and spec.bias != bias:
            raise AdapterError(
                f"{owner}: the model builds {path} with bias={spec.bias}, but the adapter "
                f"declares has_expert_bias={bias}"
            )
        module.spec = replace(spec, activation=activation, bias=bias)
        bound[path] = module.spec
    return bound


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
    model: nn.Module,
    store: ExpertStore,
    gather: bool | None = None,
    shard: ExpertShard | None = None,
) -> list[GatherSwitchGLU | DiskSwitchGLU]:
    """Replace each ``UnboundSwitchGLU`` with a dispatch module bound to ``store``.

    ``GatherSwitchGLU`` by default; ``DiskSwitchGLU`` when ``gather`` is false (or, when
    ``gather`` is ``None``, when ``LME_USE_GATHER_DISPATCH=0``). With a ``shard`` the store
    holds this rank's experts only, and each block is wrapped in a ``ShardedSwitch``.
    """
    use_gather = gather_dispatch_enabled() if gather is None else gather
    kind = GatherSwitchGLU if use_gather else DiskSwitchGLU
    bound: list[GatherSwitchGLU | DiskSwitchGLU] = []
    for path, spec in find_switches(model).items():
        if shard is None:
            module = kind(spec, store.layer(path))
            set_child(model, path, module)
        else:
            lo, hi = shard.span(spec.num_experts)
            module = kind(replace(spec, num_experts=hi - lo), store.layer(path))
            streamed = not isinstance(store, ResidentStackedExpertCache)
            set_child(model, path, ShardedSwitch(module, spec.num_experts, shard, streamed))
        bound.append(module)
    return bound
