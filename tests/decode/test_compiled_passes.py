"""Compiled decode passes compute what the model computes op by op, and say when they cannot."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.cache.kv import KVCache
from mach.cache.traced_kv import TracedKVCache
from mach.decode import compiled
from mach.decode.compiled import CompiledPasses, compile_report
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.experts.dispatch import Dispatch
from mach.io.load import LoadedModel
from mach.layers.attention import window_mask
from tests.dflash_drafts import write_random_draft

FIXTURES = Path(__file__).parents[1] / "fixtures"
QWEN = FIXTURES / "qwen3_moe"


def _prefilled(loaded: LoadedModel, prompt: list[int]) -> tuple[object, object]:
    """Two caches holding the same prompt: one for compiled passes, one for the model's own."""
    caches = []
    for _ in range(2):
        cache = loaded.cache.new()
        mx.eval(loaded.model(mx.array([prompt], mx.uint32), cache=cache))
        caches.append(cache)
    return caches[0], caches[1]


@pytest.mark.parametrize("layout", ["hf-per-expert", "mlx-q4"])
def test_compiled_steps_give_the_models_logits_across_a_buffer_boundary(layout: str) -> None:
    loaded = load_moe(QWEN / layout, dtype="float32" if layout.startswith("hf") else None)
    passes = loaded.passes
    assert passes is not None and passes.blocker(loaded.cache) is None
    rng = np.random.default_rng(3)
    fast, slow = _prefilled(loaded, rng.integers(3, 200, size=250).tolist())
    for token in rng.integers(3, 200, size=12).tolist():  # positions 250-261: the buffer grows
        step = mx.array([token], mx.uint32)
        got = passes(step, fast)  # type: ignore[arg-type]
        want = loaded.model(step[None], cache=slow)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-5)
    assert passes.compiled == 12 and fast.offset == slow.offset == 262  # type: ignore[attr-defined]
    assert fast[0].keys.shape[2] == 512  # type: ignore[index]


def test_compiled_verify_passes_roll_back_like_the_model() -> None:
    """Blocks of tokens, most of each then trimmed (rejected drafts), taps included."""
    loaded = load_moe(QWEN / "hf-per-expert", dtype="float32")
    passes = loaded.passes
    assert passes is not None
    rng = np.random.default_rng(5)
    fast, slow = _prefilled(loaded, rng.integers(3, 200, size=20).tolist())
    taps = (0, 1)
    for rejected in (3, 0, 4, 1):
        block = mx.array(rng.integers(3, 200, size=5).tolist(), mx.uint32)
        got_logits, got_hidden = passes(block, fast, taps)  # type: ignore[arg-type]
        want_logits, want_hidden = loaded.model(block[None], cache=slow, hidden_layers=taps)
        np.testing.assert_allclose(np.array(got_logits), np.array(want_logits), atol=2e-5)
        np.testing.assert_allclose(np.array(got_hidden), np.array(want_hidden), atol=2e-5)
        fast.trim(rejected)  # type: ignore[attr-defined]
        slow.trim(rejected)  # type: ignore[attr-defined]
    assert passes.compiled == 4


def _greedy(loaded: LoadedModel, prompt: list[int], tokens: int, **kwargs: object) -> object:
    return build_engine(loaded, **kwargs).generate(  # type: ignore[arg-type]
        prompt, SamplingParams(max_tokens=tokens, temperature=0.0)
    )


def test_greedy_decoding_and_dispatch_counts_match_uncompiled() -> None:
    prompt = np.random.default_rng(7).integers(3, 200, size=30).tolist()
    runs, calls = {}, {}
    for on in (True, False):
        loaded = load_moe(QWEN / "mlx-q4", compile=on)
        runs[on] = _greedy(loaded, prompt, 20)
        calls[on] = sum(m.stats()["calls"] for m in loaded.model.modules()
                        if isinstance(m, Dispatch))  # fmt: skip
    assert runs[True].tokens == runs[False].tokens  # type: ignore[attr-defined]
    assert runs[True].stats.compiled_passes == 20  # type: ignore[attr-defined]
    assert runs[False].stats.compiled_passes == 0  # type: ignore[attr-defined]
    assert calls[True] == calls[False] > 0


def test_compiled_dflash_drafts_and_verifies_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LME_DRAFT_PAYOFF", "0")  # draft every pass: timing must not matter
    draft = write_random_draft(tmp_path / "draft", 64, 3, 100, block=5)
    prompt = np.random.default_rng(2).integers(3, 200, size=40).tolist()
    runs = {}
    for on in (True, False):
        loaded = load_moe(QWEN / "hf-per-expert", dtype="float32", draft_path=str(draft),
                          compile=on)  # fmt: skip
        engine = build_engine(loaded)
        runs[on] = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0))
        assert (engine.drafter.compiled > 0) is on  # type: ignore[attr-defined]
        plain = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
        assert runs[on].tokens == plain.generate(prompt, SamplingParams(max_tokens=30)).tokens
    assert runs[True].tokens == runs[False].tokens
    assert runs[True].stats.accepted_tokens == runs[False].stats.accepted_tokens
    assert runs[True].stats.compiled_passes == runs[True].stats.target_passes - 1


@pytest.mark.parametrize("window", [None, 3])
def test_traced_attention_masks_like_the_exact_keys(window: int | None) -> None:
    rng = np.random.default_rng(window or 0)
    cache = KVCache()
    old = [mx.array(rng.normal(size=(1, 2, 9, 8)), mx.float32) for _ in "kv"]
    cache.update_and_fetch(*old)
    new = [mx.array(rng.normal(size=(1, 2, 3, 8)), mx.float32) for _ in "kv"]
    queries = mx.array(rng.normal(size=(1, 4, 3, 8)), mx.float32)
    keys, values = cache.reserve(3)
    traced = TracedKVCache(keys, values, mx.array(9, mx.int32))
    got = traced.attend(queries, *new, 0.3, None, window)
    all_keys, all_values = (mx.concatenate([a, b], axis=2) for a, b in zip(old, new, strict=True))
    mask = window_mask(3, 9, 12, 0, window) if window else "causal"
    want = mx.fast.scaled_dot_product_attention(queries, all_keys, all_values, scale=0.3,
                                                mask=mask)  # fmt: skip
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6)


def test_what_runs_uncompiled_says_why() -> None:
    streamed = load_moe(QWEN / "hf-per-expert", dtype="float32", expert_budget="200KB")
    report = compile_report(streamed.passes, streamed.cache)
    assert report == {
        "compiled": False,
        "reason": "streamed experts are looked up on the host for every layer",
    }
    windowed = load_moe(FIXTURES / "gpt_oss" / "hf-float", dtype="float32")
    assert "RotatingKVCache" in str(compile_report(windowed.passes, windowed.cache)["reason"])
    off = load_moe(QWEN / "hf-per-expert", compile=False)
    assert off.passes is None
    assert compile_report(off.passes, off.cache)["reason"] == "compiling is off (--no-compile)"
    on = load_moe(QWEN / "hf-per-expert")
    assert compile_report(on.passes, on.cache) == {"compiled": True, "reason": None}
    assert compile_report(on.passes, on.cache, batched=True)["compiled"] is True


def test_a_backend_that_cannot_compile_runs_every_pass_uncompiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(function: object) -> object:
        raise RuntimeError("[Compile::eval_cpu] Failed to compile function\nmore")

    compiled._probe.cache_clear()
    monkeypatch.setattr(compiled.mx, "compile", broken)
    try:
        loaded = load_moe(QWEN / "hf-per-expert", dtype="float32")
        assert isinstance(loaded.passes, CompiledPasses)
        reason = loaded.passes.blocker(loaded.cache)
        assert (
            reason == "mx.compile fails on the cpu here ([Compile::eval_cpu] Failed to "
            "compile function)"
        )
        result = _greedy(loaded, [5, 6, 7], 4)
        assert result.stats.compiled_passes == 0  # type: ignore[attr-defined]
        assert len(result.tokens) == 4  # type: ignore[attr-defined]
    finally:
        compiled._probe.cache_clear()


def test_where_masked_single_queries_are_slow_steps_run_uncompiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As on CUDA: one-token steps build op by op, verify passes still compile."""
    monkeypatch.setattr(compiled, "steps_compile", lambda: False)
    loaded = load_moe(QWEN / "hf-per-expert", dtype="float32")
    passes = loaded.passes
    assert passes is not None
    fast, slow = _prefilled(loaded, [5, 6, 7, 8])
    one = mx.array([9], mx.uint32)
    got = passes(one, fast)  # type: ignore[arg-type]
    np.testing.assert_allclose(np.array(got), np.array(loaded.model(one[None], cache=slow)),
                               atol=2e-5)  # fmt: skip
    assert passes.compiled == 0
    block = mx.array([10, 11, 12], mx.uint32)
    got = passes(block, fast)  # type: ignore[arg-type]
    np.testing.assert_allclose(np.array(got), np.array(loaded.model(block[None], cache=slow)),
                               atol=2e-5)  # fmt: skip
    assert passes.compiled == 1
    assert compile_report(passes, loaded.cache) == {
        "compiled": True,
        "reason": compiled.STEPS_ON_CUDA,
    }


def test_plain_stretches_of_a_drafting_engine_are_lossless(tmp_path: Path) -> None:
    """``DraftPayoff`` switching between drafted and pipelined plain passes every few passes:
    the tokens stay target-only's, and the draft keeps the context of the plain stretches."""
    from mach.decode.speculative import DraftPayoff, SpecDecEngine

    draft = write_random_draft(tmp_path / "draft", 64, 3, 100, block=5)
    loaded = load_moe(QWEN / "hf-per-expert", dtype="float32", draft_path=str(draft))
    engine = build_engine(loaded)
    assert isinstance(engine, SpecDecEngine)
    plain = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
    params = SamplingParams(max_tokens=50, temperature=0.0)
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(3, 200, size=30).tolist()
        # Timings decide who wins; both modes run either way, every few passes.
        engine.payoff = DraftPayoff(window=2, probe=3, hold=2, longest=2)
        got = engine.generate(prompt, params)
        assert got.tokens == plain.generate(prompt, params).tokens
        assert 0 < got.stats.verify_passes < got.stats.target_passes - 1
        assert len(got.tokens) == 50


def test_compiled_batched_steps_match_each_sequence_alone() -> None:
    """Rows of ragged lengths joining and leaving, sampled and greedy, past a buffer step."""
    from mach.decode.batch_scheduler import ContinuousBatchScheduler

    loaded = load_moe(QWEN / "mlx-q4")
    passes = loaded.passes
    assert passes is not None
    alone = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new, prefill_step_size=8)
    engine = ContinuousBatchScheduler(loaded.model, loaded.tokenizer, loaded.cache.new,
                                      max_batch=3, prefill_step_size=8, passes=passes)  # fmt: skip
    rng = np.random.default_rng(11)
    inputs = [rng.integers(3, 250, size=n).tolist() for n in (5, 240, 17, 2, 9)]
    limits, temperatures = (6, 30, 12, 20, 4), (0.0, 0.0, 0.8, 0.0, 1.1)
    settings = [SamplingParams(max_tokens=n, temperature=t, seed=3)
                for n, t in zip(limits, temperatures, strict=True)]  # fmt: skip
    got = engine.generate_batch(inputs, settings)
    for prompt, params, result in zip(inputs, settings, got, strict=True):
        assert result.tokens == alone.generate(prompt, params).tokens
    assert passes.compiled > 0
    assert compile_report(passes, loaded.cache, batched=True) == {"compiled": True, "reason": None}


def test_compiled_passes_through_gated_deltanet_layers_and_their_rollback() -> None:
    """qwen3_5_moe: GDN states in and out of the graph, recorded per token for a verify pass."""
    from mach.decode.speculative import _recording

    loaded = load_moe(FIXTURES / "qwen3_5_moe" / "hf-per-expert", dtype="float32")
    passes = loaded.passes
    assert passes is not None and passes.blocker(loaded.cache) is None
    rng = np.random.default_rng(13)
    fast, slow = _prefilled(loaded, rng.integers(3, 200, size=12).tolist())
    for rejected in (0, 2, 3, 0):
        block = mx.array(rng.integers(3, 200, size=4).tolist(), mx.uint32)
        for cache in (fast, slow):
            _recording(cache, True)  # type: ignore[arg-type]
        got = passes(block, fast)  # type: ignore[arg-type]
        want = loaded.model(block[None], cache=slow)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5)
        assert fast.trim(rejected) == slow.trim(rejected) == rejected  # type: ignore[attr-defined]
        for cache in (fast, slow):
            _recording(cache, False)  # type: ignore[arg-type]
        step = mx.array([int(rng.integers(3, 200))], mx.uint32)
        got = passes(step, fast)  # type: ignore[arg-type]
        np.testing.assert_allclose(np.array(got), np.array(loaded.model(step[None], cache=slow)),
                                   atol=2e-5)  # fmt: skip
    assert passes.compiled == 8
