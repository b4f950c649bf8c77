"""Short query blocks over a cache's whole buffer (the GPU's shape buckets) equal exact keys."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.cache.kv import KVCache
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.layers import attention
from tests.dflash_drafts import write_random_draft

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _cache(positions: int, rng: np.random.Generator) -> KVCache:
    cache = KVCache()
    keys, values = (mx.array(rng.normal(size=(1, 2, positions, 16)), mx.float32) for _ in "kv")
    cache.update_and_fetch(keys, values)
    return cache


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "block"])
@pytest.mark.parametrize("length", [1, 2, 7])
def test_buckets_give_the_exact_keys_answer(
    causal: bool, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(length)
    cache = _cache(37, rng)  # the buffer holds 256 positions, 37 of them written
    queries = mx.array(rng.normal(size=(1, 4, length, 16)), mx.float32)
    monkeypatch.setattr(attention, "keys_in_buckets", lambda: False)
    exact = attention.attend_block(queries, cache, 37, 0.25, causal)
    monkeypatch.setattr(attention, "keys_in_buckets", lambda: True)
    bucketed = attention.attend_block(queries, cache, 37, 0.25, causal)
    assert cache.keys is not None and cache.keys.shape[2] == 256
    np.testing.assert_allclose(np.array(bucketed), np.array(exact), atol=2e-6)
    if causal and length > 1:  # the first query sees one key fewer than the second
        early = attention.attend_block(queries[:, :, :1], cache, 37 - length + 1, 0.25, False)
        np.testing.assert_allclose(np.array(bucketed[:, :, :1]), np.array(early), atol=2e-6)


def test_bucketed_dflash_decoding_is_target_only_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verify passes and draft blocks through the buckets, as on a GPU: output unchanged."""
    monkeypatch.setattr(attention, "keys_in_buckets", lambda: True)
    path = FIXTURES / "qwen3_moe" / "hf-per-expert"
    draft = write_random_draft(tmp_path / "draft", 64, 3, 100, block=5)
    # Compiled passes attend through their own masks; this test is about the eager buckets.
    loaded = load_moe(path, dtype="float32", draft_path=str(draft), compile=False)
    engine = build_engine(loaded)
    plain = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    prompt = np.random.default_rng(2).integers(3, 200, size=300).tolist()  # past one bucket
    got = engine.generate(prompt, params)
    assert got.tokens == plain.generate(prompt, params).tokens
    assert got.stats.verify_passes > 0
