"""The release's MTP module as a drafter: lossless speculative decoding, switches, the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.decode.speculative import SpecDecEngine
from mach.errors import MachError
from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "deepseek_v4"


@pytest.fixture(autouse=True)
def draft_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture's MTP head is random and never confident: open the gate so it drafts."""
    monkeypatch.setenv("LME_RHO_GATE", "0")
    monkeypatch.setenv("LME_RHO_GATE_MIN", "1")


@pytest.mark.parametrize("layout", ["upstream", "upstream-fp8"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_the_mtp_draft_equals_target_only(layout: str, k: int) -> None:
    loaded = load_moe(FAMILY / layout)
    model, tokenizer, _, cache = loaded
    engine = build_engine(loaded, num_draft_tokens=k)
    assert isinstance(engine, SpecDecEngine)
    prompt = checks.reference(FAMILY / layout)["input_ids"][0, :20].tolist()
    params = SamplingParams(max_tokens=40, temperature=0.0)
    expected = TargetEngine(model, tokenizer, cache.new).generate(prompt, params).tokens
    result = engine.generate(prompt, params)
    assert result.tokens == expected
    assert result.stats.draft_tokens > 0 and result.stats.verify_passes > 0


def test_sampling_with_the_draft_runs_and_is_reproducible() -> None:
    engine = build_engine(load_moe(FAMILY / "upstream"), num_draft_tokens=2)
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=11)
    first = engine.generate([3, 4, 5, 6], params)
    assert first.tokens == engine.generate([3, 4, 5, 6], params).tokens
    assert len(first.tokens) == 24 and first.stats.draft_tokens > 0


def test_draft_switch_and_missing_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_moe(FAMILY / "upstream")
    monkeypatch.setenv("LME_V4_DRAFT", "0")
    assert isinstance(build_engine(loaded), TargetEngine)
    monkeypatch.delenv("LME_V4_DRAFT")
    fused = load_moe(FAMILY / "hf-fused")  # transformers drops mtp.*
    assert isinstance(build_engine(fused), TargetEngine)
    with pytest.raises(MachError, match="no draft here"):
        build_engine(fused, draft=True)


def test_default_gate_is_the_measured_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from mach_adapter_deepseek.mtp import DEFAULT_GATE

    monkeypatch.delenv("LME_RHO_GATE")
    monkeypatch.delenv("LME_RHO_GATE_MIN")
    engine = build_engine(load_moe(FAMILY / "upstream"))
    assert isinstance(engine, SpecDecEngine) and engine.gate == DEFAULT_GATE


def test_rho_gate_closes_the_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_moe(FAMILY / "upstream")
    monkeypatch.setenv("LME_RHO_GATE", "1")
    monkeypatch.setenv("LME_RHO_GATE_MIN", "0")
    engine = build_engine(loaded, num_draft_tokens=3)
    result = engine.generate([3, 4, 5], SamplingParams(max_tokens=10, temperature=0.0))
    assert result.stats.draft_tokens == 0 and result.stats.acceptance_length == 1.0
