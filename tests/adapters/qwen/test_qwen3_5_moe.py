"""qwen3_5_moe (Gated DeltaNet hybrid) against transformers and mlx-lm."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import REGISTRY, load_moe
from mach.cache.gdn import GDNCache
from mach.io.convert import convert
from mach.io.residency import StackedStreamingWarning
from mach.layers.gated_delta import chunked_gated_delta, recurrent_gated_delta
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "qwen3_5_moe"
FLOAT_LAYOUTS = ["hf-per-expert", "hf-fused-wrapper"]
# mlx-lm's own qwen3_5_moe differs from transformers by 0.0143 (max |logit| error) on the float
# wrapper fixture, so its quantized logits are matched within twice that.
MLX_LM_TOLERANCE = 0.03


def test_registered_with_hybrid_cache_kind() -> None:
    adapter = REGISTRY["qwen3_5_moe"]
    assert adapter.kv_cache_kind == "hybrid_gdn"
    assert "qwen3_5_moe_text" in adapter.model_types


@pytest.mark.parametrize("layout", FLOAT_LAYOUTS)
def test_logits_match_transformers_past_one_chunk(layout: str) -> None:
    assert checks.reference(FAMILY / layout)["input_ids"].shape[1] > 64
    assert checks.max_logit_error(FAMILY / layout) <= 1e-4


def test_quantized_logits_match_mlx_lm() -> None:
    assert checks.max_logit_error(FAMILY / "mlx-q4") <= MLX_LM_TOLERANCE


@pytest.mark.parametrize("layout", [*FLOAT_LAYOUTS, "mlx-q4"])
def test_prefill_then_decode_matches_full_forward(layout: str) -> None:
    checks.incremental_matches_full(FAMILY / layout, split=70)


def test_batch_rows_match_single_sequences() -> None:
    checks.batch_rows_match_single(FAMILY / "hf-fused-wrapper")


@pytest.mark.parametrize("layout", FLOAT_LAYOUTS)
def test_greedy_tokens_match_transformers(layout: str) -> None:
    expected = checks.reference(FAMILY / layout)["greedy"][0].tolist()
    assert checks.greedy_tokens(FAMILY / layout, prefill_step_size=32) == expected


def test_chunked_and_recurrent_forms_agree() -> None:
    mx.random.seed(3)
    b, length, h, dk, dv = 2, 150, 3, 16, 8
    q, k = mx.random.normal((b, length, h, dk)), mx.random.normal((b, length, h, dk))
    v = mx.random.normal((b, length, h, dv))
    g = -mx.abs(mx.random.normal((b, length, h))) * 0.3
    beta = mx.sigmoid(mx.random.normal((b, length, h)))
    state = mx.random.normal((b, h, dk, dv)) * 0.1
    out_r, state_r, _ = recurrent_gated_delta(q, k, v, g, beta, state)
    out_c, state_c = chunked_gated_delta(q, k, v, g, beta, state)
    np.testing.assert_allclose(np.array(out_c), np.array(out_r), atol=1e-5)
    np.testing.assert_allclose(np.array(state_c), np.array(state_r), atol=1e-5)


def test_snapshot_restore_and_recorded_rollback() -> None:
    model, _, _, cache = load_moe(FAMILY / "hf-per-expert")
    ids = mx.array(checks.reference(FAMILY / "hf-per-expert")["input_ids"][:1])
    model(ids[:, :20], cache=cache)
    saved = cache.snapshot()
    after = np.array(model(ids[:, 20:21], cache=cache))
    cache.restore(saved)
    np.testing.assert_array_equal(np.array(model(ids[:, 20:21], cache=cache)), after)
    # Speculative rollback: record, run 4 tokens, take 3 back, continue as if never run.
    cache.restore(saved)
    gdn = [c for c in cache if isinstance(c, GDNCache)]
    for c in gdn:
        c.start_recording()
    model(ids[:, 20:24], cache=cache)
    assert cache.is_trimmable()
    cache.trim(3)
    np.testing.assert_allclose(np.array(model(ids[:, 21:22], cache=cache)),
                               np.array(load_then_step(ids)), atol=1e-5)  # fmt: skip


def load_then_step(ids: mx.array) -> mx.array:
    model, _, _, cache = load_moe(FAMILY / "hf-per-expert")
    model(ids[:, :21], cache=cache)
    return model(ids[:, 21:22], cache=cache)


@pytest.mark.parametrize("source", ["stacked", "sidecar"])
def test_streaming_matches_resident(source: str, tmp_path: Path) -> None:
    path = FAMILY / "mlx-q4" if source == "stacked" else convert(FAMILY / "hf-fused-wrapper",
                                                                 tmp_path / "sidecar")  # fmt: skip
    ref = checks.reference(FAMILY / ("mlx-q4" if source == "stacked" else "hf-fused-wrapper"))
    resident = np.array(load_moe(path, streaming=False)[0](mx.array(ref["input_ids"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackedStreamingWarning)
        probe = load_moe(path, streaming=True, expert_budget="1GB")[2]
        budget = probe.stats()["bytes_per_slot"] * 3
        model, _, store, _ = load_moe(path, expert_budget=budget)
    streamed = np.array(model(mx.array(ref["input_ids"])))
    np.testing.assert_allclose(streamed, resident, atol=1e-5)
    assert store.stats()["slots_per_layer"] == 3 and store.stats()["misses"] > 0


def test_generate_with_the_chat_template() -> None:
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mach", "generate", str(FAMILY / "hf-fused-wrapper"), "--chat",
         "hello", "-n", "6", "--json"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["tokens"]) == 6
    # No thinking tags from this random model: everything is answer.
    assert payload["reasoning"] == "" and payload["content"] == payload["text"]


def test_mtp_and_vision_weights_are_ignored(tmp_path: Path) -> None:
    import shutil

    from safetensors.numpy import save_file

    target = tmp_path / "with-mtp"
    shutil.copytree(FAMILY / "hf-fused-wrapper", target)
    extra = {"mtp.layers.0.mlp.experts.0.gate_proj.weight": np.ones((64, 64), np.float32),
             "mtp.fc.weight": np.ones((64, 128), np.float32)}  # fmt: skip
    save_file(extra, str(target / "model-mtp.safetensors"))
    ref = checks.reference(target)
    model, _, _, _ = load_moe(target)
    assert np.abs(np.array(model(mx.array(ref["input_ids"]))) - ref["logits"]).max() <= 1e-4
