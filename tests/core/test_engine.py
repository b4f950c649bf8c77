"""TargetEngine: stop tokens and strings, max tokens, seeds and statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams

FIXTURE = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "hf-per-expert"


@pytest.fixture(scope="module")
def engine() -> TargetEngine:
    model, tokenizer, _, cache = load_moe(FIXTURE)
    return TargetEngine(model, tokenizer, cache.new)


@pytest.fixture(scope="module")
def prompt(engine: TargetEngine) -> list[int]:
    assert engine.tokenizer is not None
    return engine.tokenizer.encode("import os\nimport sys\n")


def test_max_tokens_ends_with_length(engine: TargetEngine, prompt: list[int]) -> None:
    result = engine.generate(prompt, SamplingParams(max_tokens=7))
    assert result.finish_reason == "length" and len(result.tokens) == 7
    assert result.stats.prompt_tokens == len(prompt) and result.stats.generation_tokens == 7
    assert result.stats.peak_memory_bytes > 0 and result.stats.generation_tps > 0


def test_zero_max_tokens(engine: TargetEngine, prompt: list[int]) -> None:
    result = engine.generate(prompt, SamplingParams(max_tokens=0))
    assert result.tokens == [] and result.finish_reason == "length"


def test_stop_token_ends_generation_without_being_emitted(
    engine: TargetEngine, prompt: list[int]
) -> None:
    free = engine.generate(prompt, SamplingParams(max_tokens=10)).tokens
    stop_at = free[4]
    result = engine.generate(prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop_at]))
    assert result.finish_reason == "stop"
    assert result.tokens == free[: free.index(stop_at)]


def test_stop_string_truncates_the_text(engine: TargetEngine, prompt: list[int]) -> None:
    free = engine.generate(prompt, SamplingParams(max_tokens=12))
    assert engine.tokenizer is not None
    stop = free.text[5:8]
    assert stop, free.text
    result = engine.generate(prompt, SamplingParams(max_tokens=12, stop=[stop]))
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]


def test_streamed_text_equals_decoded_tokens(engine: TargetEngine, prompt: list[int]) -> None:
    result = engine.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=3))
    assert engine.tokenizer is not None
    assert result.text == engine.tokenizer.decode(result.tokens)


def test_seeded_sampling_repeats(engine: TargetEngine, prompt: list[int]) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=42)
    assert engine.generate(prompt, params).tokens == engine.generate(prompt, params).tokens


def test_empty_prompt_is_rejected(engine: TargetEngine) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([], SamplingParams())
