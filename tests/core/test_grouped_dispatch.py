"""The CPU prefill path (one dense matmul per expert) against the gather kernels."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mach.experts import dispatch
from mach.experts.activations import GateActivation
from mach.experts.dispatch import GatherSwitchGLU, grouped_on_cpu
from mach.experts.matrix import ExpertMatrix, ExpertWeights, concat_outputs
from mach.experts.store import ResidentLayer
from mach.experts.switch import SwitchSpec

EXPERTS, HIDDEN, INNER, TOP_K = 8, 64, 32, 2


def matrix(
    rng: np.random.Generator, out: int, inp: int, quant: str | None, bias: bool
) -> ExpertMatrix:
    weight = mx.array(rng.normal(0, 0.1, (EXPERTS, out, inp)).astype(np.float32))
    extra = mx.array(rng.normal(0, 0.1, (EXPERTS, out)).astype(np.float32)) if bias else None
    if quant is None:
        return ExpertMatrix(weight, bias=extra)
    mode, bits = ("mxfp4", 4) if quant == "mxfp4" else ("affine", int(quant))
    packed = mx.quantize(weight, group_size=32, bits=bits, mode=mode)
    scales = packed[1]
    biases = packed[2] if len(packed) > 2 else None
    return ExpertMatrix(packed[0], scales, biases, extra, bits, 32, mode)


def switch(quant: str | None, bias: bool, fused: bool, kind: str) -> GatherSwitchGLU:
    rng = np.random.default_rng(7)
    gate, up = (matrix(rng, INNER, HIDDEN, quant, bias) for _ in range(2))
    down = matrix(rng, HIDDEN, INNER, quant, bias)
    weights = ExpertWeights(down=down, gate=gate, up=up)
    if fused:
        weights = ExpertWeights(down=down, gate_up=concat_outputs(gate, up))
    spec = SwitchSpec(EXPERTS, HIDDEN, INNER, GateActivation(kind), bias, TOP_K)
    return GatherSwitchGLU(spec, ResidentLayer(weights))


def routes(tokens: int, seed: int = 0) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(0, 1, (1, tokens, HIDDEN)).astype(np.float32))
    # Top-k ids are distinct per token, and some experts get no rows at all.
    ids = np.stack([rng.choice(EXPERTS - 2, TOP_K, replace=False) for _ in range(tokens)])
    return x, mx.array(ids[None].astype(np.uint32))


CASES = [
    (None, False, True, "swiglu"),
    (None, True, False, "clamped_swiglu"),
    ("4", False, True, "swiglu"),
    ("8", True, True, "geglu"),
    ("mxfp4", True, True, "clamped_swiglu"),
]


@pytest.mark.parametrize(("quant", "bias", "fused", "kind"), CASES)
def test_grouped_path_matches_the_gather_kernels(
    quant: str | None, bias: bool, fused: bool, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = 64
    assert grouped_on_cpu(tokens * TOP_K, EXPERTS, quant is not None)
    x, ids = routes(tokens)
    grouped = switch(quant, bias, fused, kind)
    got = grouped(x, ids)
    assert grouped.stats()["grouped_calls"] == 1
    monkeypatch.setattr(dispatch, "GROUPED_ROWS_PER_EXPERT", {"float": 10**9, "quantized": 10**9})
    gathered = switch(quant, bias, fused, kind)
    want = gathered(x, ids)
    assert gathered.stats()["grouped_calls"] == 0 and gathered.stats()["sorted_calls"] == 1
    assert got.shape == want.shape == (1, tokens, TOP_K, HIDDEN)
    # Same products, other summation order: float32 rounding only.
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=2e-5)


def test_decode_sized_calls_stay_on_the_gather_kernels() -> None:
    assert not grouped_on_cpu(8 * TOP_K, EXPERTS, quantized=False)
    assert not grouped_on_cpu(8 * TOP_K, EXPERTS, quantized=True)
    layer = switch(None, False, True, "swiglu")
    x, ids = routes(8)
    layer(x, ids)
    assert layer.stats()["grouped_calls"] == 0


@pytest.mark.parametrize(("experts", "quantized"), [(16, False), (128, True), (4, True)])
def test_mach_check_names_the_path_dispatch_takes(experts: int, quantized: bool) -> None:
    paths = dispatch.dispatch_paths(experts, quantized)
    rows = int(paths["prefill"].split(" from ")[1].split()[0])
    kernel = "gather_qmm" if quantized else "gather_mm"
    assert paths["decode"] == kernel and paths["prefill"].endswith(f"({kernel} below)")
    assert grouped_on_cpu(rows, experts, quantized) and rows >= dispatch.SORT_THRESHOLD
    assert not grouped_on_cpu(rows - 1, experts, quantized) or rows - 1 < dispatch.SORT_THRESHOLD


@pytest.mark.parametrize(("quant", "bias", "fused", "kind"), CASES)
@pytest.mark.parametrize("tokens", [2, 9])
def test_a_row_per_route_matches_the_broadcast_gather(
    quant: str | None,
    bias: bool,
    fused: bool,
    kind: str,
    tokens: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Verify-pass sized calls: each route its own row, the same outputs."""
    assert dispatch.rows_per_route(tokens * TOP_K, TOP_K)
    assert not dispatch.rows_per_route(TOP_K, TOP_K)  # a one-token step needs no rows
    x, ids = routes(tokens, seed=tokens)
    got = switch(quant, bias, fused, kind)(x, ids)
    monkeypatch.setattr(dispatch, "rows_per_route", lambda routes, top_k: False)
    want = switch(quant, bias, fused, kind)(x, ids)
    assert got.shape == want.shape == (1, tokens, TOP_K, HIDDEN)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-6)
