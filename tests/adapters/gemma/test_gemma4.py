"""gemma4 (26B-A4B style MoE) against transformers and mlx-lm."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import REGISTRY, arch_summary, load_moe, plugins
from mach.check import check_checkpoint
from mach.io.convert import convert
from mach.io.residency import StackedStreamingWarning
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "gemma4"
LAYOUTS = ["hf", "hf-wrapper", "mlx-q4"]


def test_entry_point_registers_gemma4() -> None:
    assert "gemma4" in REGISTRY
    assert plugins.plugin_record("gemma").distribution == "mach-adapter-gemma"
    summary = arch_summary(REGISTRY["gemma4"])
    assert summary["swiglu_variant"] == "geglu" and summary["kv_cache_kind"] == "rotating"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_the_reference_past_the_window(layout: str) -> None:
    assert checks.reference(FAMILY / layout)["input_ids"].shape[1] > 6
    assert checks.max_logit_error(FAMILY / layout) <= 1e-4


@pytest.mark.parametrize("layout", ["hf", "mlx-q4"])
def test_decode_across_the_window_boundary(layout: str) -> None:
    checks.incremental_matches_full(FAMILY / layout, split=3)


def test_batch_rows_match_single_sequences() -> None:
    checks.batch_rows_match_single(FAMILY / "hf-wrapper")


@pytest.mark.parametrize("layout", ["hf", "hf-wrapper"])
def test_greedy_tokens_with_chunked_prefill(layout: str) -> None:
    expected = checks.reference(FAMILY / layout)["greedy"][0].tolist()
    assert checks.greedy_tokens(FAMILY / layout, prefill_step_size=4) == expected


def test_full_layers_share_keys_and_values() -> None:
    model, _, _, _ = load_moe(FAMILY / "hf")
    assert "v_proj" not in model.layers[2].self_attn
    assert "v_proj" in model.layers[0].self_attn


@pytest.mark.parametrize("source", ["stacked", "sidecar"])
def test_streaming_matches_resident(source: str, tmp_path: Path) -> None:
    path = FAMILY / "mlx-q4" if source == "stacked" else convert(FAMILY / "hf-wrapper",
                                                                 tmp_path / "sidecar")  # fmt: skip
    ref = checks.reference(FAMILY / ("mlx-q4" if source == "stacked" else "hf-wrapper"))
    resident = np.array(load_moe(path, streaming=False)[0](mx.array(ref["input_ids"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        probe = load_moe(path, streaming=True, expert_budget="1GB")[2]
        model, _, store, _ = load_moe(path, expert_budget=probe.stats()["bytes_per_slot"] * 2)
    streamed = np.array(model(mx.array(ref["input_ids"])))
    np.testing.assert_allclose(streamed, resident, atol=1e-5)
    assert store.stats()["slots_per_layer"] == 2


def test_check_reports_gemma4() -> None:
    report = check_checkpoint(FAMILY / "mlx-q4")
    assert report.loads and report.arch == "gemma4" and report.routed_quantization == "affine4"
    assert report.residency["streaming"]["available"] and report.continuous_batching is True
