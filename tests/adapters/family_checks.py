"""Checks every family runs on its golden fixtures: parity, cache steps, batches, greedy tokens.

A family's test module calls these with its fixture folders; the reference outputs were written
by tools/make_fixtures.py from transformers (float layouts) or mlx-lm (quantized layouts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams


def reference(layout_dir: Path) -> dict[str, np.ndarray]:
    with np.load(layout_dir / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def load(layout_dir: Path) -> tuple[Any, Any, Any, Any]:
    return load_moe(layout_dir, dtype="float32")


def max_logit_error(layout_dir: Path) -> float:
    """Largest |mach - reference| over a batch of two full forwards."""
    model, _, _, _ = load(layout_dir)
    ref = reference(layout_dir)
    logits = model(mx.array(ref["input_ids"])).astype(mx.float32)
    assert logits.shape == ref["logits"].shape
    return float(np.abs(np.array(logits) - ref["logits"]).max())


def incremental_matches_full(layout_dir: Path, split: int = 5, atol: float = 1e-4) -> None:
    """Prefill then token-by-token decode through the cache equals one full forward."""
    model, _, _, cache = load(layout_dir)
    ids = mx.array(reference(layout_dir)["input_ids"][:1])
    full = np.array(model(ids))
    steps = [np.array(model(ids[:, :split], cache=cache))]
    for t in range(split, ids.shape[1]):
        steps.append(np.array(model(ids[:, t : t + 1], cache=cache)))
    assert cache.offset == ids.shape[1]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=atol, rtol=0)


def batch_rows_match_single(layout_dir: Path, atol: float = 1e-4) -> None:
    """Each row of a batched forward equals that sequence run alone."""
    model, _, _, _ = load(layout_dir)
    ids = mx.array(reference(layout_dir)["input_ids"])
    batched = np.array(model(ids))
    for row in range(ids.shape[0]):
        alone = np.array(model(ids[row : row + 1]))
        np.testing.assert_allclose(batched[row : row + 1], alone, atol=atol, rtol=0)


def greedy_tokens(layout_dir: Path, prefill_step_size: int = 512) -> list[int]:
    """Greedy continuation of the reference prompt through the decode engine."""
    model, _, _, cache = load(layout_dir)
    ref = reference(layout_dir)
    engine = TargetEngine(model, None, cache.new, prefill_step_size=prefill_step_size)
    params = SamplingParams(max_tokens=ref["greedy"].shape[1], temperature=0.0)
    return engine.generate(ref["input_ids"][0].tolist(), params).tokens


def prefix_reuse_matches(layout_dir: Path, cache_dir: Path, block: int = 16) -> None:
    """Miss, full hit, partial hit (a longer prompt) and a hit after a restart from the disk
    tier all give the tokens and log-probabilities of decoding without a prefix cache."""
    from mach.cache.disk import DiskKVCache
    from mach.cache.fingerprint import model_fingerprint
    from mach.cache.prefix import PrefixCache

    loaded = load(layout_dir)
    model, tokenizer, _, cache = loaded
    fingerprint = model_fingerprint(loaded)

    def prefix_cache() -> PrefixCache:
        disk = DiskKVCache(cache_dir, 1 << 30, fingerprint)
        return PrefixCache(fingerprint, 1 << 30, disk, block)

    plain = TargetEngine(model, tokenizer, cache.new, prefill_step_size=24)
    cached = TargetEngine(model, tokenizer, cache.new, 24, prefix_cache())
    rng = np.random.default_rng(17)
    first = rng.integers(3, 500, size=75).tolist()
    longer = first + rng.integers(3, 500, size=30).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3)

    def same(engine: TargetEngine, prompt: list[int], reused: int) -> None:
        want, got = plain.generate(prompt, params), engine.generate(prompt, params)
        assert got.tokens == want.tokens
        assert got.stats.cached_tokens == reused
        events = [list(engine.stream(prompt, params)), list(plain.stream(prompt, params))]
        for a, b in zip(*events, strict=True):
            if a.logprob is not None:
                assert b.logprob is not None and abs(a.logprob - b.logprob) < 1e-5
                assert a.top_logprobs is not None and b.top_logprobs is not None
                for (ta, la), (tb, lb) in zip(a.top_logprobs, b.top_logprobs, strict=True):
                    assert ta == tb and abs(la - lb) < 1e-5

    # A KV-only cache is snapshotted before each prompt's last token; others on block bounds.
    exact = all(layer.kind == "kv" for layer in cache)
    same(cached, first, 0)
    same(cached, longer, 74 if exact else 64)
    assert cached.prefix_cache is not None and cached.prefix_cache.stats()["l1_hits"] >= 2
    restarted = TargetEngine(model, tokenizer, cache.new, 24, prefix_cache())
    same(restarted, longer, 104 if exact else 96)
    assert restarted.prefix_cache is not None
    assert restarted.prefix_cache.stats()["l2_hits"] == 1
