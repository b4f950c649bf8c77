"""Prefix reuse on the deepseek_v4 fixtures: a cached prefix gives the same output as none."""

from __future__ import annotations

from pathlib import Path

import pytest

from mach import load_moe
from mach.cache.prefix import PrefixCache
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.decode.speculative import SpecDecEngine
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "deepseek_v4"


def test_prefix_reuse_equals_full_prefill(tmp_path: Path) -> None:
    checks.prefix_reuse_matches(FAMILY / "upstream", tmp_path / "prompt-cache")


def test_speculative_decoding_from_a_cached_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollback of rejected drafts works from a restored compressed cache: greedy output stays
    the target-only output on a miss, a hit and a longer prompt."""
    monkeypatch.setenv("LME_RHO_GATE", "0")
    monkeypatch.setenv("LME_RHO_GATE_MIN", "1")
    monkeypatch.setenv("LME_DRAFT_PAYOFF", "0")  # draft on every pass: rollback is the point
    loaded = load_moe(FAMILY / "upstream")
    model, tokenizer, _, cache = loaded
    prefix_cache = PrefixCache.for_model(loaded, directory=tmp_path, block_size=16)
    engine = build_engine(loaded, num_draft_tokens=3, prefix_cache=prefix_cache)
    assert isinstance(engine, SpecDecEngine)
    plain = TargetEngine(model, tokenizer, cache.new)
    prompt = checks.reference(FAMILY / "upstream")["input_ids"][0].tolist() * 4
    params = SamplingParams(max_tokens=24, temperature=0.0)
    for tokens, reused in ((prompt[:50], 0), (prompt[:50], 48), (prompt, 48)):
        result = engine.generate(tokens, params)
        assert result.tokens == plain.generate(tokens, params).tokens
        assert result.stats.cached_tokens == reused and result.stats.draft_tokens > 0
