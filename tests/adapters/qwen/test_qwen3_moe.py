"""qwen3_moe against transformers (float layouts) and mlx-lm (quantized layouts)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import REGISTRY
from mach.adapter import ExpertLayout
from mach.io.checkpoint import open_checkpoint
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_moe"
FLOAT_LAYOUTS = ["hf-per-expert", "hf-fused", "hf-sharded", "hf-tied", "mlx-stacked"]
QUANT_LAYOUTS = ["mlx-q4", "mlx-q8"]
ALL_LAYOUTS = FLOAT_LAYOUTS + QUANT_LAYOUTS
# mach and mlx-lm run the same quantized kernels on the same packed weights; what remains is
# summation order (mach fuses gate|up into one gather), far below one 4-bit quantization step.
QUANT_ATOL = 1e-4


@pytest.mark.parametrize("layout", FLOAT_LAYOUTS)
def test_logits_match_transformers(layout: str) -> None:
    assert checks.max_logit_error(FAMILY / layout) <= 1e-4


@pytest.mark.parametrize("layout", QUANT_LAYOUTS)
def test_logits_match_mlx_lm(layout: str) -> None:
    assert checks.max_logit_error(FAMILY / layout) <= QUANT_ATOL


@pytest.mark.parametrize("layout", ["hf-per-expert", "hf-tied", "mlx-q4"])
def test_incremental_decode_matches_full_forward(layout: str) -> None:
    checks.incremental_matches_full(FAMILY / layout)


@pytest.mark.parametrize("layout", ["hf-fused", "mlx-q8"])
def test_batch_rows_match_single_sequences(layout: str) -> None:
    checks.batch_rows_match_single(FAMILY / layout)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_greedy_tokens_match_the_reference(layout: str) -> None:
    expected = checks.reference(FAMILY / layout)["greedy"][0].tolist()
    assert checks.greedy_tokens(FAMILY / layout) == expected


def test_every_float_layout_gives_the_same_greedy_tokens() -> None:
    runs = {layout: checks.greedy_tokens(FAMILY / layout) for layout in FLOAT_LAYOUTS[:-2]}
    runs["mlx-stacked"] = checks.greedy_tokens(FAMILY / "mlx-stacked")
    assert len({tuple(tokens) for tokens in runs.values()}) == 1, runs


def test_chunked_prefill_gives_the_same_tokens() -> None:
    layout = FAMILY / "hf-per-expert"
    assert checks.greedy_tokens(layout, prefill_step_size=3) == checks.greedy_tokens(layout)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("hf-per-expert", ExpertLayout.SLICED),
        ("hf-fused", ExpertLayout.STACKED),
        ("mlx-stacked", ExpertLayout.STACKED),
        ("mlx-q4", ExpertLayout.STACKED),
    ],
)
def test_layout_classification(layout: str, expected: ExpertLayout) -> None:
    names = open_checkpoint(FAMILY / layout).tensor_names
    assert REGISTRY["qwen3_moe"].classify_layout(names) is expected


def test_dense_layers_from_mlp_only_layers() -> None:
    model, _, store, _ = checks.load(FAMILY / "hf-per-expert")
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["SparseMoeBlock", "GatedMLP", "SparseMoeBlock"]
    assert store.stats()["layers"] == 2


def test_decoder_sparse_step() -> None:
    model, _, _, _ = checks.load(FAMILY / "hf-tied")
    assert [type(layer.mlp).__name__ for layer in model.layers] == [
        "GatedMLP",
        "SparseMoeBlock",
        "GatedMLP",
    ]


def test_quantized_router_keeps_its_eight_bits() -> None:
    model, _, store, _ = checks.load(FAMILY / "mlx-q4")
    gate = model.layers[0].mlp.gate
    assert type(gate).__name__ == "QuantizedLinear" and gate.bits == 8
    experts = store.layer("model.layers.0.mlp.switch_mlp").weights
    assert experts.gate_up is not None and experts.gate_up.bits == 4
    assert experts.down.group_size == 64


def test_bfloat16_load_stays_close() -> None:
    from mach import load_moe

    model, _, _, _ = load_moe(FAMILY / "hf-fused", dtype="bfloat16")
    ref = checks.reference(FAMILY / "hf-fused")
    logits = np.array(model(mx.array(ref["input_ids"])).astype(mx.float32))
    # bfloat16 can flip a near-tied routing decision, so bound the typical error, not the worst.
    assert np.median(np.abs(logits - ref["logits"])) < 0.01


def test_load_reports_progress_up_to_the_total() -> None:
    from mach import load_moe

    seen: list[tuple[int, int]] = []
    load_moe(FAMILY / "hf-sharded", progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1][0] == seen[-1][1] > 1_000_000
