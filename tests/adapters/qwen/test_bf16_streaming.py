"""``bf16_streaming``: full-precision experts streamed into bounded bfloat16 banks."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.check import check_checkpoint
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.errors import CheckpointError
from mach.io.options import LoadOptions
from mach.io.residency import StackedStreamingWarning

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"
BUDGET = 400_000


@pytest.mark.parametrize("layout", ["hf-per-expert", "mlx-stacked"])
def test_bf16_banks_match_the_float_reference_within_bfloat16(layout: str) -> None:
    path = FAMILY / layout
    ref = np.load(path / "reference.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        plain = load_moe(path, expert_residency="streaming", expert_budget=BUDGET)
        half = load_moe(path, expert_residency="bf16_streaming", expert_budget=BUDGET)
    assert half.store.kind == "bf16_streaming"
    banks = [a for layer in half.store.layers.values() for a in layer.arrays.values()]
    assert {a.dtype for a in banks} == {mx.bfloat16}
    plain_stats, half_stats = plain.store.stats(), half.store.stats()
    assert half_stats["bytes_per_slot"] * 2 == plain_stats["bytes_per_slot"]
    assert half_stats["slots_per_layer"] >= plain_stats["slots_per_layer"]
    assert half.store.nbytes <= BUDGET
    ids = mx.array(ref["input_ids"])
    exact = np.array(plain.model(ids))
    rounded = np.array(half.model(ids))
    assert np.abs(exact - ref["logits"]).max() < 1e-4
    error = np.abs(rounded - ref["logits"]).max()
    # bfloat16 keeps 8 bits of mantissa: expert outputs move by about 2^-8 of their size.
    assert 0 < error < 2e-2 * np.abs(ref["logits"]).max()


def test_bf16_decode_goes_through_the_bank() -> None:
    path = FAMILY / "hf-per-expert"
    loaded = load_moe(path, expert_residency="bf16_streaming", expert_budget=120_000)
    prompt = np.load(path / "reference.npz")["input_ids"][0].tolist()
    engine = TargetEngine(loaded.model, None, loaded.cache.new)
    result = engine.generate(prompt, SamplingParams(max_tokens=12))
    stats = loaded.store.stats()
    assert len(result.tokens) == 12 and stats["hits"] > 0 and stats["misses"] > 0
    assert stats["evictions"] > 0


def test_bf16_streaming_refuses_quantized_experts() -> None:
    with pytest.raises(CheckpointError, match="these experts are affine4"):
        load_moe(FAMILY / "mlx-q4", expert_residency="bf16_streaming")
    report = check_checkpoint(FAMILY / "mlx-q4")
    assert report.residency["bf16_streaming"]["available"] is False
    assert "affine4" in report.residency["bf16_streaming"]["reason"]
    float_report = check_checkpoint(FAMILY / "hf-per-expert", LoadOptions(expert_budget=BUDGET))
    assert float_report.residency["bf16_streaming"]["available"] is True
