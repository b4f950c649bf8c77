"""Decode steps whose streamed experts are looked up on the device, checked once per step.

A streaming bank normally reads each MoE layer's routed ids back to the host to find the
misses: one wait per layer, which keeps the device idle while the host catches up. When the
bank already holds every expert a step routes to (the usual case once decoding settles), that
wait buys nothing. ``DeviceRouting`` runs such a step with every layer mapping ids to slots
through a table on the device, and one flag per layer saying whether all its routed experts
were held. The engine reads the flags with the step's token, at the one wait a step has
anyway: if they all hold, the step is right as it is and the banks mark the experts used; if
one does not, the step read some other expert's weights, and the engine restores the caches,
reads every missing expert the step's layers routed to (``DeferredStep.fetch``) and runs it on
the device again; after a few such tries it runs it through the banks' host path, which reads
the misses layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mach.env import env_flag
from mach.experts.bank import DeferredCall, LayerExpertBank

DEVICE_ROUTING_ENV = "MACH_DEVICE_ROUTING"
RETRIES = 3
"""Device runs of a step after its first, each after fetching what the last one missed."""


@dataclass
class DeferredStep:
    """The device-routed calls of one step and the flag that says whether all were held."""

    calls: list[DeferredCall]
    held: mx.array

    def settle(self) -> None:
        """The step stands: count its hits and mark its experts used, in call order."""
        for call in self.calls:
            call.bank.settle(call.indices)

    def fetch(self) -> None:
        """The step met a missing expert: read every expert its calls routed to and the banks
        lack. The first layer that missed routed from the right hidden state, so a step run
        again after this gets at least one layer further; the later layers' ids are guesses
        that are usually close."""
        for call in self.calls:
            call.bank.fetch(call.indices)


class DeviceRouting:
    """Switches a model's streaming banks to device routing for the steps an engine picks."""

    def __init__(self, banks: list[LayerExpertBank]) -> None:
        self.banks = banks
        self._calls: list[DeferredCall] = []

    @classmethod
    def of(cls, model: nn.Module, enabled: bool | None = None) -> DeviceRouting | None:
        """Device routing for ``model``'s banks; ``None`` without streaming banks, under
        expert parallelism (its blocks read the ids to pick stand-ins), or when
        ``enabled`` (default: ``MACH_DEVICE_ROUTING``) is off. It is on by default on a GPU
        and off on a CPU, where MLX runs the step on the host's own threads and a layer's wait
        costs little."""
        from mach.experts.dispatch import Dispatch
        from mach.experts.parallel import ShardedSwitch

        if enabled is None:
            enabled = env_flag(DEVICE_ROUTING_ENV, mx.default_device() != mx.cpu)
        if not enabled:
            return None
        modules = list(model.modules())
        if any(isinstance(m, ShardedSwitch) for m in modules):
            return None
        banks = [m.experts for m in modules
                 if isinstance(m, Dispatch) and isinstance(m.experts, LayerExpertBank)]  # fmt: skip
        return cls(banks) if banks else None

    def begin(self) -> None:
        """Route the decode calls built from now on on the device."""
        self._calls = []
        for bank in self.banks:
            bank.deferred = self._calls

    def end(self) -> DeferredStep:
        """Back to the host path; the calls routed since ``begin`` and their joint flag."""
        for bank in self.banks:
            bank.deferred = None
        calls, self._calls = self._calls, []
        held = mx.all(mx.stack([c.held for c in calls])) if calls else mx.array(True)
        return DeferredStep(calls, held)

    def misses(self) -> int:
        """Misses the banks have counted so far (a host-path step that adds none found every
        expert held, so the next one is worth routing on the device)."""
        return sum(bank.misses for bank in self.banks)
