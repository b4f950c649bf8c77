"""Expert stores: who holds routed-expert weights and how ids map to bank slots."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx

from mach.errors import ShapeMismatchError
from mach.experts.matrix import ExpertMatrix, ExpertWeights, concat_outputs, gather_ready
from mach.experts.switch import SwitchSpec

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_PARTS = ("weight", "scales", "biases", "bias")


class LayerExperts(ABC):
    """One layer's routed experts as the dispatch kernels see them."""

    @abstractmethod
    def route(self, indices: mx.array) -> tuple[ExpertWeights, mx.array]:
        """Weights holding every expert in ``indices``, and ``indices`` as rows of them."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of expert weights this layer holds in memory."""


class ResidentLayer(LayerExperts):
    """Every expert of the layer in memory: expert ids are the rows."""

    def __init__(self, weights: ExpertWeights) -> None:
        self.weights = weights

    def route(self, indices: mx.array) -> tuple[ExpertWeights, mx.array]:
        return self.weights, indices

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes


class ExpertStore(ABC):
    """Holds the routed experts of every MoE layer, keyed by the switch module's path."""

    kind: str

    @abstractmethod
    def layer(self, prefix: str) -> LayerExperts:
        """The experts of the switch module at ``prefix``."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters for reports (``mach generate``, ``mach bench``)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of expert weights held in memory."""

    @property
    def bytes_read(self) -> int:
        """Expert bytes read from disk since loading; a resident store reads none."""
        return 0

    def record_decode_step(self, batch: int, tokens: int, nbytes: int) -> None:  # noqa: B027
        """Count a decode step of ``batch`` rows that handed out ``tokens`` tokens and read
        ``nbytes`` of experts (a resident store reads none and keeps no count)."""

    def materialize(  # noqa: B027 - optional step, nothing to do by default
        self, progress: Callable[[int], None] | None = None
    ) -> None:
        """Read what the store keeps resident from the start; ``progress(bytes)`` as it goes."""


def _infer_format(
    name: str, parts: Mapping[str, mx.array], input_dims: int
) -> tuple[int | None, int | None, str]:
    weight, scales = parts["weight"], parts.get("scales")
    if scales is None:
        return None, None, "affine"
    bits = weight.shape[-1] * 32 // input_dims
    group_size = input_dims // scales.shape[-1] if scales.shape[-1] else 0
    if bits * input_dims != weight.shape[-1] * 32 or group_size * scales.shape[-1] != input_dims:
        raise ShapeMismatchError(
            f"{name}: packed weight {list(weight.shape)} / scales {list(scales.shape)} do not "
            f"describe a quantization of input size {input_dims}"
        )
    mode = "affine" if "biases" in parts else ("mxfp4" if scales.dtype == mx.uint8 else "affine")
    return bits, group_size, mode


def take_expert_matrix(
    weights: dict[str, mx.array],
    name: str,
    num_experts: int,
    output_dims: int,
    input_dims: int,
    describe: Callable[[str], str] = str,
) -> ExpertMatrix:
    """Pop ``name.{weight,scales,biases,bias}`` from ``weights`` and check their shapes."""
    parts = {p: weights.pop(f"{name}.{p}") for p in _PARTS if f"{name}.{p}" in weights}
    if "weight" not in parts:
        raise ShapeMismatchError(
            f"{describe(name)}: routed expert weight {name}.weight is missing; config.json "
            "describes experts or layers the weights do not hold"
        )
    bits, group_size, mode = _infer_format(describe(name), parts, input_dims)
    matrix = ExpertMatrix(
        weight=parts["weight"],
        scales=parts.get("scales"),
        biases=parts.get("biases"),
        bias=parts.get("bias"),
        bits=bits,
        group_size=group_size,
        mode=mode,
    )
    matrix = gather_ready(matrix)
    found = (matrix.num_experts, matrix.output_dims, matrix.input_dims)
    expected = (num_experts, output_dims, input_dims)
    if found != expected:
        raise ShapeMismatchError(
            f"{describe(name)}: {name}.weight holds [experts, out, in] = {list(found)} but the "
            f"config implies {list(expected)}; config.json does not match the weights"
        )
    if matrix.bias is not None and tuple(matrix.bias.shape) != (num_experts, output_dims):
        raise ShapeMismatchError(
            f"{describe(name)}: {name}.bias has shape {list(matrix.bias.shape)}, expected "
            f"{[num_experts, output_dims]}"
        )
    return matrix


class ResidentStackedExpertCache(ExpertStore):
    """Every expert of every layer resident in memory, stacked on axis 0 (``--no-streaming``).

    Gate and up are concatenated into one matrix per layer when their formats agree, so
    dispatch runs two gather kernels per layer instead of three.
    """

    kind = "resident"

    def __init__(self, layers: dict[str, ResidentLayer]) -> None:
        self.layers = layers

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, mx.array],
        switches: Mapping[str, SwitchSpec],
        describe: Callable[[str], str] = str,
        fuse_gate_up: bool = True,
    ) -> ResidentStackedExpertCache:
        """Take each switch's expert tensors out of ``weights`` (engine names).

        Shapes are checked here; no tensor data is read until ``materialize``.
        """
        layers: dict[str, ResidentLayer] = {}
        for prefix, spec in switches.items():
            e, d, h = spec.num_experts, spec.input_dims, spec.hidden_dims
            gate = take_expert_matrix(weights, f"{prefix}.gate_proj", e, h, d, describe)
            up = take_expert_matrix(weights, f"{prefix}.up_proj", e, h, d, describe)
            down = take_expert_matrix(weights, f"{prefix}.down_proj", e, d, h, describe)
            fused = concat_outputs(gate, up) if fuse_gate_up else None
            if fused is not None:
                layers[prefix] = ResidentLayer(ExpertWeights(down=down, gate_up=fused))
            else:
                layers[prefix] = ResidentLayer(ExpertWeights(down=down, gate=gate, up=up))
        return cls(layers)

    def materialize(self, progress: Callable[[int], None] | None = None) -> None:
        """Read every expert into memory, one layer at a time to bound the transient peak."""
        for layer in self.layers.values():
            mx.eval(layer.weights.arrays())
            if progress is not None:
                progress(layer.nbytes)

    def layer(self, prefix: str) -> LayerExperts:
        return self.layers[prefix]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": len(self.layers), "bytes_resident": self.nbytes}
