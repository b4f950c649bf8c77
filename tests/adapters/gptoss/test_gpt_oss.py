"""gpt_oss against transformers: sinks, sliding windows, YaRN, MXFP4 experts."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import REGISTRY, arch_summary, load_moe, plugins
from mach.check import check_checkpoint
from mach.io.convert import convert
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "gpt_oss"
LAYOUTS = ["hf-float", "mxfp4"]


def test_entry_point_registers_gpt_oss() -> None:
    assert "gpt_oss" in REGISTRY
    assert plugins.plugin_record("gptoss").distribution == "mach-adapter-gptoss"
    summary = arch_summary(REGISTRY["gpt_oss"])
    # A sliding window batches only when it keeps no prefix: unknown until the caches exist.
    assert summary["kv_cache_kind"] == "rotating" and summary["continuous_batching"] is None
    assert summary["has_expert_bias"] and summary["swiglu_variant"] == "clamped_swiglu"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers_past_the_window(layout: str) -> None:
    assert checks.reference(FAMILY / layout)["input_ids"].shape[1] > 8
    assert checks.max_logit_error(FAMILY / layout) <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_across_the_window_boundary(layout: str) -> None:
    checks.incremental_matches_full(FAMILY / layout, split=3)


def test_batch_rows_match_single_sequences() -> None:
    checks.batch_rows_match_single(FAMILY / "mxfp4")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_with_chunked_prefill(layout: str) -> None:
    expected = checks.reference(FAMILY / layout)["greedy"][0].tolist()
    assert checks.greedy_tokens(FAMILY / layout, prefill_step_size=5) == expected


def test_mxfp4_experts_stay_mxfp4() -> None:
    _, _, store, _ = load_moe(FAMILY / "mxfp4")
    weights = store.layer("model.layers.0.mlp.experts").weights  # type: ignore[attr-defined]
    matrix = weights.gate_up or weights.gate
    assert matrix.mode == "mxfp4" and matrix.bits == 4 and matrix.group_size == 32
    assert matrix.bias is not None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streams_from_the_sidecar(layout: str, tmp_path: Path) -> None:
    sidecar = convert(FAMILY / layout, tmp_path / "sidecar")
    ref = checks.reference(FAMILY / layout)
    probe = load_moe(sidecar, streaming=True, expert_budget="1GB")[2]
    model, _, store, _ = load_moe(sidecar, expert_budget=probe.stats()["bytes_per_slot"] * 2)
    logits = np.array(model(mx.array(ref["input_ids"])))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    assert store.stats()["slots_per_layer"] == 2


def test_check_reports_the_rotating_cache_honestly() -> None:
    report = check_checkpoint(FAMILY / "mxfp4")
    assert report.loads and report.arch == "gpt_oss"
    assert report.routed_quantization == "mxfp4"
    # Its sliding-window caches keep no prefix, checked on the caches the family builds.
    assert report.continuous_batching is True and report.sequential_reason is None


def test_mlx_community_mxfp4_q8_layout() -> None:
    # mlx-lm's own logits on this fixture drift from transformers by up to 1.4 past the sliding
    # window (0.045 inside it, from its YaRN rounding), so the 8-bit layout is held to the
    # transformers reference with a tolerance for 8-bit attention, router and embeddings.
    model, _, store, _ = load_moe(FAMILY / "mlx-mxfp4-q8")
    assert type(model.layers[0].mlp.router).__name__ == "QuantizedLinear"
    assert model.layers[0].mlp.router.bits == 8
    weights = store.layer("model.layers.0.mlp.experts").weights  # type: ignore[attr-defined]
    assert (weights.gate_up or weights.gate).mode == "mxfp4"
    ref = checks.reference(FAMILY / "mxfp4")
    error = np.abs(np.array(model(mx.array(ref["input_ids"]))) - ref["logits"])
    assert error.max() <= 0.1 and float(np.median(error)) <= 0.01
