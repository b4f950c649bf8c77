"""``ExpertMatrix``: one projection of every expert of a layer, float or quantized."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class ExpertMatrix:
    """Weights ``[experts, out, in]`` (packed when quantized) plus optional per-expert bias."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bias: mx.array | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    @property
    def output_dims(self) -> int:
        return int(self.weight.shape[1])

    @property
    def input_dims(self) -> int:
        if self.bits is None:
            return int(self.weight.shape[2])
        return int(self.weight.shape[2]) * 32 // self.bits

    @property
    def nbytes(self) -> int:
        parts = (self.weight, self.scales, self.biases, self.bias)
        return sum(p.nbytes for p in parts if p is not None)

    def arrays(self) -> list[mx.array]:
        return [p for p in (self.weight, self.scales, self.biases, self.bias) if p is not None]

    def apply(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """``x @ W[indices].T (+ bias[indices])`` through one gather kernel."""
        if self.scales is not None:
            out = mx.gather_qmm(
                x,
                self.weight,
                self.scales,
                self.biases,
                rhs_indices=indices,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                sorted_indices=sorted_indices,
            )
        else:
            out = mx.gather_mm(
                x.astype(self.weight.dtype),
                self.weight.swapaxes(-1, -2),
                rhs_indices=indices,
                sorted_indices=sorted_indices,
            ).astype(x.dtype)
        if self.bias is not None:
            out = out + mx.expand_dims(self.bias[indices], -2)
        return out

    def apply_grouped(self, x: mx.array, counts: Sequence[int]) -> mx.array:
        """Rows sorted by slot, ``counts[slot]`` of them each, through one dense matmul per slot.

        Quantized slots are dequantized first, so every product is a float32 BLAS call: on a CPU
        that beats a gather kernel by several times once each expert serves a few rows.
        """
        outputs, start = [], 0
        for slot, count in enumerate(counts):
            if count:
                outputs.append(self._dense(x[start : start + count], slot))
                start += count
        return mx.concatenate(outputs) if outputs else x[:, : self.output_dims]

    def _dense(self, x: mx.array, slot: int) -> mx.array:
        if self.scales is not None:
            biases = self.biases[slot] if self.biases is not None else None
            weight = mx.dequantize(
                self.weight[slot],
                self.scales[slot],
                biases,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        else:
            weight = self.weight[slot]
        out = x.astype(mx.float32) @ weight.astype(mx.float32).T
        if self.bias is not None:
            out = out + self.bias[slot].astype(mx.float32)
        return out.astype(x.dtype)

    def apply_one(self, x: mx.array, slot: int) -> mx.array:
        """``x @ W[slot].T (+ bias[slot])`` for rows that all go to one expert."""
        if self.scales is not None:
            biases = self.biases[slot] if self.biases is not None else None
            out = mx.quantized_matmul(
                x,
                self.weight[slot],
                self.scales[slot],
                biases,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        else:
            out = (x.astype(self.weight.dtype) @ self.weight[slot].T).astype(x.dtype)
        if self.bias is not None:
            out = out + self.bias[slot]
        return out


@dataclass
class ExpertWeights:
    """The gate, up and down matrices of a set of experts (rows addressed by slot)."""

    down: ExpertMatrix
    gate: ExpertMatrix | None = None
    up: ExpertMatrix | None = None
    gate_up: ExpertMatrix | None = None
    """gate and up stacked on the output axis; when set, ``gate`` and ``up`` are ``None``."""

    def matrices(self) -> list[ExpertMatrix]:
        return [m for m in (self.gate_up, self.gate, self.up, self.down) if m is not None]

    def arrays(self) -> list[mx.array]:
        return [a for m in self.matrices() for a in m.arrays()]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices())


def concat_outputs(first: ExpertMatrix, second: ExpertMatrix) -> ExpertMatrix | None:
    """Stack two projections on the output axis (gate|up) when their formats agree."""
    same = (
        first.bits == second.bits
        and first.group_size == second.group_size
        and first.mode == second.mode
        and (first.scales is None) == (second.scales is None)
        and (first.biases is None) == (second.biases is None)
        and (first.bias is None) == (second.bias is None)
        and first.weight.dtype == second.weight.dtype
        and first.weight.shape[2] == second.weight.shape[2]
    )
    if not same:
        return None

    def cat(a: mx.array | None, b: mx.array | None) -> mx.array | None:
        return None if a is None or b is None else mx.concatenate([a, b], axis=1)

    return ExpertMatrix(
        weight=mx.concatenate([first.weight, second.weight], axis=1),
        scales=cat(first.scales, second.scales),
        biases=cat(first.biases, second.biases),
        bias=cat(first.bias, second.bias),
        bits=first.bits,
        group_size=first.group_size,
        mode=first.mode,
    )


def gather_ready(matrix: ExpertMatrix) -> ExpertMatrix:
    """Float experts in a dtype the device's gather kernel takes.

    MLX's CPU ``gather_mm`` runs in float32 only, so half-precision float experts are widened
    there; quantized experts and GPU devices keep the stored dtype.
    """
    if matrix.quantized or matrix.weight.dtype == mx.float32:
        return matrix
    if mx.default_device() != mx.cpu:
        return matrix
    bias = matrix.bias.astype(mx.float32) if matrix.bias is not None else None
    return ExpertMatrix(matrix.weight.astype(mx.float32), bias=bias)
