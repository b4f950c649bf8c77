"""Constrained decoding: every engine's output matches its grammar, whatever the sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mach import load_moe
from mach.decode.batch_scheduler import ContinuousBatchScheduler
from mach.decode.engine import TargetEngine
from mach.decode.grammar import Grammar, GrammarError, GrammarTokenizer, sequence_matcher
from mach.decode.params import SamplingParams
from mach.default_model import default_model_path
from mach.tokenizer.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded() -> tuple[object, Tokenizer, object]:
    model, tokenizer, _, cache = load_moe(default_model_path())
    assert tokenizer is not None
    return model, tokenizer, cache


@pytest.fixture(scope="module")
def engine(loaded: tuple[object, Tokenizer, object]) -> TargetEngine:
    model, tokenizer, cache = loaded
    return TargetEngine(model, tokenizer, cache.new)  # type: ignore[arg-type, attr-defined]


def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("def main():\n    return")


def valid_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age", "tags"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    assert all(tag in "abc" for tag in value["tags"]) and len(value["tags"]) <= 3


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.5])
def test_target_engine_output_parses_and_validates(
    engine: TargetEngine, temperature: float
) -> None:
    assert engine.tokenizer is not None
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=3,
                            grammar=Grammar.json(PERSON))  # fmt: skip
    result = engine.generate(prompt(engine.tokenizer), params)
    assert result.finish_reason == "stop", result.text
    valid_person(result.text)


def test_unconstrained_output_is_not_json(engine: TargetEngine) -> None:
    """The model left alone writes code, so the grammar above is what made it JSON."""
    assert engine.tokenizer is not None
    result = engine.generate(prompt(engine.tokenizer), SamplingParams(max_tokens=30))
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_batched_rows_keep_their_own_grammars(loaded: tuple[object, Tokenizer, object]) -> None:
    model, tokenizer, cache = loaded
    scheduler = ContinuousBatchScheduler(model, tokenizer, cache.new, max_batch=4)  # type: ignore[arg-type, attr-defined]
    plain = SamplingParams(max_tokens=20)
    person = SamplingParams(max_tokens=120, temperature=1.0, seed=5, grammar=Grammar.json(PERSON))
    digits = SamplingParams(max_tokens=20, grammar=Grammar.regex("[0-9]{4}-[0-9]{2}"))
    results = scheduler.generate_batch([prompt(tokenizer)] * 3, [plain, person, digits])
    alone = TargetEngine(model, tokenizer, cache.new).generate(prompt(tokenizer), plain)  # type: ignore[arg-type, attr-defined]
    assert results[0].tokens == alone.tokens
    valid_person(results[1].text)
    assert len(results[2].text) == 7 and results[2].text[4] == "-"
    assert results[2].text.replace("-", "").isdigit()


def test_batched_grammar_equals_target_engine(loaded: tuple[object, Tokenizer, object]) -> None:
    model, tokenizer, cache = loaded
    params = SamplingParams(max_tokens=80, grammar=Grammar.json(PERSON))
    scheduler = ContinuousBatchScheduler(model, tokenizer, cache.new, max_batch=2)  # type: ignore[arg-type, attr-defined]
    [batched] = scheduler.generate_batch([prompt(tokenizer)], params)
    alone = TargetEngine(model, tokenizer, cache.new).generate(prompt(tokenizer), params)  # type: ignore[arg-type, attr-defined]
    assert batched.tokens == alone.tokens


def test_max_tokens_can_cut_the_value_short(engine: TargetEngine) -> None:
    assert engine.tokenizer is not None
    params = SamplingParams(max_tokens=3, grammar=Grammar.json(PERSON))
    result = engine.generate(prompt(engine.tokenizer), params)
    assert result.finish_reason == "length" and result.text.startswith("{")


def test_padded_vocabulary_rows_are_never_allowed(loaded: tuple[object, Tokenizer, object]) -> None:
    _, tokenizer, _ = loaded
    matcher = sequence_matcher(Grammar.json(), tokenizer)
    assert matcher is not None
    allowed = matcher.allowed(tokenizer.vocab_size + 100)
    assert allowed.shape == (1, tokenizer.vocab_size + 100)
    assert not allowed[0, tokenizer.vocab_size :].any().item()
    assert allowed[0, : tokenizer.vocab_size].any().item()


def test_a_complete_grammar_allows_only_end_tokens(
    loaded: tuple[object, Tokenizer, object],
) -> None:
    _, tokenizer, _ = loaded
    matcher = sequence_matcher(Grammar.regex("ab"), tokenizer)
    assert matcher is not None
    for token in tokenizer.encode("ab", add_special_tokens=False):
        matcher.accept(token)
    assert matcher.finished
    allowed = np.array(matcher.allowed(tokenizer.vocab_size)[0])
    assert set(np.flatnonzero(allowed).tolist()) == tokenizer.eos_token_ids


def test_a_token_outside_the_grammar_is_an_error(loaded: tuple[object, Tokenizer, object]) -> None:
    _, tokenizer, _ = loaded
    matcher = sequence_matcher(Grammar.regex("[0-9]+", name="digits"), tokenizer)
    assert matcher is not None
    with pytest.raises(GrammarError, match="digits: token"):
        matcher.accept(tokenizer.encode("x", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    ("grammar", "problem"),
    [
        (Grammar("start: nothing_defined", "lark"), "lark"),
        (Grammar.json({"type": "object", "properties": {"a": {"type": "strnig"}}}, "bad"), "bad"),
        (Grammar.regex("(unclosed", "re"), "re"),
    ],
)
def test_a_bad_grammar_names_itself(loaded: tuple[object, Tokenizer, object], grammar: Grammar,
                                     problem: str) -> None:  # fmt: skip
    _, tokenizer, _ = loaded
    with pytest.raises(GrammarError, match=f"^{problem}: "):
        GrammarTokenizer.of(tokenizer).check(grammar)


def test_special_tokens_are_written_by_id(loaded: tuple[object, Tokenizer, object]) -> None:
    _, tokenizer, _ = loaded
    grammars = GrammarTokenizer.of(tokenizer)
    assert grammars.literal("<tool_call>") == f"<[{tokenizer.token_id('<tool_call>')}]>"
    assert grammars.literal('say "hi"') == '"say \\"hi\\""'


def test_a_grammar_needs_a_tokenizer() -> None:
    with pytest.raises(GrammarError, match="tokenizer"):
        sequence_matcher(Grammar.json(), None)


def test_fixture_checkpoints_use_the_same_path(fixtures_dir: Path) -> None:
    """A checkpoint with another tokenizer gets its own grammar tokenizer."""
    model, tokenizer, _, cache = load_moe(fixtures_dir / "qwen3_moe" / "hf-per-expert")
    assert tokenizer is not None
    result = TargetEngine(model, tokenizer, cache.new).generate(
        tokenizer.encode("hello"), SamplingParams(max_tokens=200, grammar=Grammar.json(PERSON))
    )
    valid_person(result.text)
