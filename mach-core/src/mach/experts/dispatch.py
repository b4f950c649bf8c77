"""Dispatch of routed tokens to experts held by a store."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mach.errors import AdapterError
from mach.experts.matrix import ExpertWeights
from mach.experts.store import LayerExperts
from mach.experts.switch import SwitchSpec

# Below this many routes, sorting costs more than the gather kernels save.
SORT_THRESHOLD = 64
# On a CPU, once a call routes enough rows per expert of the layer (a prefill chunk), one float32
# BLAS matmul per expert beats MLX's gather kernels, which do not use BLAS. Each expert then
# costs a fixed slice (or dequantization) of its weights, so the break-even is in rows per
# expert: measured near 8 for float experts and 4 for quantized ones (whose gather kernel is
# slower) on 16-128-expert layers. Decode steps stay on the gather kernels.
GROUPED_ROWS_PER_EXPERT = {"float": 8, "quantized": 4}


def rows_per_route(routes: int, top_k: int) -> bool:
    """Whether a call below ``SORT_THRESHOLD`` gives each route its own row of ``x``.

    Handed the tokens broadcast against their ``[tokens, k]`` expert ids, MLX's gather kernels
    slow down with the routes much faster than the work grows; one row per route does not.
    Measured on a CPU: 32 routes of 4-bit 32x128x256 experts 10.4 ms broadcast, 1.5 ms as
    rows; 64 routes of 512x1024 ones 333 ms against 43 ms. On an H200: 32 routes of
    bfloat16 32x128x256 experts 82 us against 46 us; 64 routes of 4-bit Qwen3-30B-A3B experts
    522 us against 138 us. So every call of more than one token runs as rows (a verify pass,
    a batched decode step); a one-token step is the same either way.
    """
    return routes > top_k


def grouped_on_cpu(routes: int, num_experts: int, quantized: bool) -> bool:
    """Whether a call of ``routes`` rows runs one dense matmul per expert."""
    rows = GROUPED_ROWS_PER_EXPERT["quantized" if quantized else "float"]
    return routes >= rows * num_experts and mx.default_device() == mx.cpu


def dispatch_paths(num_experts: int, quantized: bool) -> dict[str, str]:
    """Which kernels run a layer's routed experts on the default device, by call size."""
    kernel = "gather_qmm" if quantized else "gather_mm"
    if mx.default_device() != mx.cpu:
        return {"decode": kernel, "prefill": kernel}
    rows = max(SORT_THRESHOLD, GROUPED_ROWS_PER_EXPERT["quantized" if quantized else "float"]
               * num_experts)  # fmt: skip
    dense = "dequantized, then one BLAS matmul" if quantized else "one BLAS matmul"
    prefill = f"{dense} per expert from {rows} routed rows per call ({kernel} below)"
    return {"decode": kernel, "prefill": prefill}


def _sort_routes(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    rows = x.flatten(0, -3)[order // k]
    return rows, flat[order], inverse


class Dispatch(nn.Module):
    """What both dispatch modules hold: the switch's spec, its experts and the activation."""

    counted: tuple[str, ...] = ("_calls", "_routes")
    """The counters ``stats`` reports; a compiled pass replays their change per call."""

    def __init__(self, spec: SwitchSpec, experts: LayerExperts) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.spec = spec
        self._experts = experts
        if spec.activation is None:
            raise AdapterError(
                "routed experts have no activation bound; load the model through mach.load_moe"
            )
        self._activation = spec.activation.function()
        self._calls = 0
        self._routes = 0

    @property
    def experts(self) -> LayerExperts:
        return self._experts

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.counted}

    def add_counters(self, change: dict[str, int]) -> None:
        for name, value in change.items():
            setattr(self, name, getattr(self, name) + value)


class GatherSwitchGLU(Dispatch):
    """Routed experts through gather kernels: no Python loop over routes.

    ``__call__(x [..., D], indices [..., k]) -> [..., k, D]``; the caller applies router
    weights. Expert ids become store slots (identity for resident stores), then gate and up
    run as one fused gather when the store holds them fused, followed by the down projection.
    """

    counted = (*Dispatch.counted, "_sorted_calls", "_grouped_calls")

    def __init__(self, spec: SwitchSpec, experts: LayerExperts) -> None:
        super().__init__(spec, experts)
        self._sorted_calls = 0
        self._grouped_calls = 0
        self._fused = False

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        experts, slots = self._experts.route(indices)
        x = mx.expand_dims(x, (-2, -3))
        do_sort = slots.size >= SORT_THRESHOLD
        self._calls += 1
        self._routes += slots.size
        as_rows = not do_sort and rows_per_route(slots.size, indices.shape[-1])
        if do_sort:
            self._sorted_calls += 1
            x, idx, inverse = _sort_routes(x, slots)
        elif as_rows:
            k = indices.shape[-1]
            x, idx = mx.repeat(x.flatten(0, -3), k, axis=0), slots.flatten()
        else:
            idx = slots
        self._fused = experts.gate_up is not None
        if do_sort and grouped_on_cpu(slots.size, self.spec.num_experts, experts.down.quantized):
            self._grouped_calls += 1
            out = self._grouped(experts, x.squeeze(-2), idx)
            return out[inverse].reshape(*indices.shape, -1)
        if experts.gate_up is not None:
            gate, up = mx.split(experts.gate_up.apply(x, idx, do_sort), 2, axis=-1)
        else:
            assert experts.gate is not None and experts.up is not None
            gate = experts.gate.apply(x, idx, do_sort)
            up = experts.up.apply(x, idx, do_sort)
        out = experts.down.apply(self._activation(gate, up), idx, do_sort)
        if do_sort:
            out = out[inverse].reshape(*indices.shape, 1, -1)
        elif as_rows:
            out = out.reshape(*indices.shape, 1, -1)
        return out.squeeze(-2)

    def _grouped(self, experts: ExpertWeights, rows: mx.array, slots: mx.array) -> mx.array:
        """Rows sorted by slot through one dense matmul per slot (``grouped_on_cpu``)."""
        counts = np.bincount(np.asarray(slots), minlength=experts.down.num_experts).tolist()
        if experts.gate_up is not None:
            gate, up = mx.split(experts.gate_up.apply_grouped(rows, counts), 2, axis=-1)
        else:
            assert experts.gate is not None and experts.up is not None
            gate = experts.gate.apply_grouped(rows, counts)
            up = experts.up.apply_grouped(rows, counts)
        return experts.down.apply_grouped(self._activation(gate, up), counts)

    def stats(self) -> dict[str, Any]:
        """Calls, how many took the sorted and the grouped paths, routes served and whether
        gate|up is fused."""
        return {
            "calls": self._calls,
            "sorted_calls": self._sorted_calls,
            "grouped_calls": self._grouped_calls,
            "routes": self._routes,
            "fused_gate_up": self._fused,
        }


class DiskSwitchGLU(Dispatch):
    """The legacy dispatch: a Python loop over the distinct experts a call routes to.

    Each expert is fetched from the store on its own (into a bank slot when streaming) and run
    on the rows routed to it. Kept to diagnose the gather path (``LME_USE_GATHER_DISPATCH=0``).
    """

    counted = (*Dispatch.counted, "_expert_runs")

    def __init__(self, spec: SwitchSpec, experts: LayerExperts) -> None:
        super().__init__(spec, experts)
        self._expert_runs = 0

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k = indices.shape[-1]
        ids = np.asarray(indices).reshape(-1, k)
        rows = x.reshape(-1, x.shape[-1])
        outputs, positions = [], []
        self._calls += 1
        self._routes += ids.size
        for expert in np.unique(ids):
            token, choice = np.nonzero(ids == expert)
            weights, slots = self._experts.route(mx.array([[int(expert)]]))
            slot = int(np.asarray(slots).reshape(-1)[0])
            h = rows[mx.array(token)]
            if weights.gate_up is not None:
                gate, up = mx.split(weights.gate_up.apply_one(h, slot), 2, axis=-1)
            else:
                assert weights.gate is not None and weights.up is not None
                gate, up = weights.gate.apply_one(h, slot), weights.up.apply_one(h, slot)
            outputs.append(weights.down.apply_one(self._activation(gate, up), slot))
            positions.append(token * k + choice)
            self._expert_runs += 1
        order = np.argsort(np.concatenate(positions))
        out = mx.concatenate(outputs)[mx.array(order)]
        return out.reshape(*indices.shape, -1)

    def stats(self) -> dict[str, Any]:
        """Calls, routes served and how many per-expert runs the loop made."""
        return {"calls": self._calls, "routes": self._routes, "expert_runs": self._expert_runs}
