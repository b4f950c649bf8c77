"""Reply grammars, walked at random: whatever a sampler picks from the mask parses and validates.

A random walk takes any token the mask allows, so it explores far more of a grammar than a
trained model would; every walk must end in a reply the server's parsers accept.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend

from mach.chat.harmony import HarmonyStream
from mach.chat.reasoning import ReasoningTags, split_reasoning
from mach.chat.tool_calls import parse_tool_calls
from mach.decode.grammar import Grammar, GrammarError, GrammarMatcher, GrammarTokenizer
from mach.decode.structured import ReplyFormat, ToolSpec, reply_grammar, tool_specs
from mach.default_model import default_model_path
from mach.tokenizer.tokenizer import Tokenizer
from tests.random_schemas import random_object_schema, random_schema

HARMONY = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>",
           "<|return|>"]  # fmt: skip
MAX_STEPS = 600


def tokenizer_with(specials: list[str] = (), eos: list[str] = ()) -> Tokenizer:  # type: ignore[assignment]
    """The default model's tokenizer with extra special tokens (and end tokens among them)."""
    backend = Backend.from_file(str(default_model_path() / "tokenizer.json"))
    backend.add_special_tokens(list(specials))
    ends = [backend.token_to_id(t) for t in eos] or [0, 2]
    return Tokenizer(backend, eos_token_ids=ends)


@pytest.fixture(scope="module")
def plain() -> GrammarTokenizer:
    return GrammarTokenizer.of(tokenizer_with())


def walk(matcher: GrammarMatcher, rng: random.Random, tokenizer: Tokenizer) -> str:
    """Sample uniformly from the mask (end and special tokens favoured, so walks finish) until
    an end token; the text, special tokens kept."""
    special = {i for i in range(tokenizer.vocab_size) if matcher.tokenizer.llg.is_special_token(i)}
    out: list[int] = []
    for _ in range(MAX_STEPS):
        allowed = np.flatnonzero(np.array(matcher.allowed(tokenizer.vocab_size)[0])).tolist()
        ends = [t for t in allowed if t in tokenizer.eos_token_ids]
        rest = [t for t in allowed if t not in tokenizer.eos_token_ids]
        marks = [t for t in rest if t in special]
        if ends and (rng.random() < 0.5 or not rest):
            return tokenizer.decode(out, skip_special_tokens=False)
        token = rng.choice(marks if marks and rng.random() < 0.2 else rest)
        matcher.accept(token)
        out.append(token)
    raise AssertionError(f"no end after {MAX_STEPS} tokens: {tokenizer.decode(out)!r}")


def test_100_random_schemas_always_give_valid_json(plain: GrammarTokenizer) -> None:
    rng = random.Random(0)
    for case in range(100):
        schema = random_schema(rng)
        text = walk(plain.matcher(Grammar.json(schema)), rng, plain.tokenizer)
        try:
            jsonschema.validate(json.loads(text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            raise AssertionError(f"case {case}: {text!r} for {schema}: {exc}") from None


def test_json_object_mode_takes_any_object_and_nothing_else(plain: GrammarTokenizer) -> None:
    grammar = reply_grammar(plain, ReplyFormat(), json_answer=True)
    assert grammar is not None
    tokenizer = plain.tokenizer
    matcher = plain.matcher(grammar)
    for token in tokenizer.encode('{"a": [1, {"b": null}], "c": "x"}', add_special_tokens=False):
        matcher.accept(token)
    allowed = np.array(matcher.allowed(tokenizer.vocab_size)[0])
    assert set(np.flatnonzero(allowed).tolist()) == tokenizer.eos_token_ids
    with pytest.raises(GrammarError):
        plain.matcher(grammar).accept(tokenizer.encode("[", add_special_tokens=False)[0])


def tools(rng: random.Random, count: int) -> list[ToolSpec]:
    return [ToolSpec(f"tool_{i}", random_object_schema(rng)) for i in range(count)]


def check_calls(calls: list[Any], offered: list[ToolSpec], text: str) -> None:
    by_name = {t.name: t for t in offered}
    assert calls, f"no call in {text!r}"
    for call in calls:
        jsonschema.validate(call.arguments, by_name[call.name].parameters)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_parse_and_validate(plain: GrammarTokenizer, parallel: bool) -> None:
    rng = random.Random(2)
    for _ in range(15):
        offered = tools(rng, rng.randint(1, 3))
        grammar = reply_grammar(plain, ReplyFormat(), tools=offered, must_call=True,
                                parallel=parallel)  # fmt: skip
        assert grammar is not None
        text = walk(plain.matcher(grammar), rng, plain.tokenizer)
        content, calls = parse_tool_calls(text)
        assert content == ""
        check_calls(calls, offered, text)
        assert parallel or len(calls) == 1


def test_auto_tools_with_a_json_answer_give_one_or_the_other(plain: GrammarTokenizer) -> None:
    rng = random.Random(3)
    offered = tools(rng, 2)
    schema = random_object_schema(rng)
    grammar = reply_grammar(plain, ReplyFormat(), schema, json_answer=True, tools=offered)
    assert grammar is not None
    kinds = set()
    for _ in range(30):
        text = walk(plain.matcher(grammar), rng, plain.tokenizer)
        content, calls = parse_tool_calls(text)
        if calls:
            check_calls(calls, offered, text)
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(content), schema)
            kinds.add("json")
    assert kinds == {"call", "json"}


@pytest.mark.parametrize("started", [False, True])
def test_reasoning_comes_first_then_the_answer(started: bool) -> None:
    tags = ReasoningTags()
    tokenizer = tokenizer_with([tags.open, tags.close])
    grammars = GrammarTokenizer.of(tokenizer)
    fmt = ReplyFormat(reasoning=tags, reasoning_started=started)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    grammar = reply_grammar(grammars, fmt, schema, json_answer=True)
    assert grammar is not None
    rng = random.Random(4)
    reasoned = 0
    for _ in range(20):
        text = walk(grammars.matcher(grammar), rng, tokenizer)
        _, content = split_reasoning(text, tags, started)
        jsonschema.validate(json.loads(content), schema)
        reasoned += tags.close in text
    assert reasoned > 0


def test_reasoning_needs_its_close_tag_as_one_token(plain: GrammarTokenizer) -> None:
    """Without the tags as tokens there is no block to allow, unless the prompt opened one."""
    grammar = reply_grammar(plain, ReplyFormat(reasoning=ReasoningTags()), json_answer=True)
    assert grammar is not None and "THOUGHT " not in grammar.lark.split("\n", 1)[1]
    started = ReplyFormat(reasoning=ReasoningTags(), reasoning_started=True)
    with pytest.raises(GrammarError, match="</think>"):
        reply_grammar(plain, started, json_answer=True)


def test_harmony_calls_and_answers() -> None:
    tokenizer = tokenizer_with(HARMONY, eos=["<|return|>", "<|call|>"])
    grammars = GrammarTokenizer.of(tokenizer)
    rng = random.Random(5)
    offered = tools(rng, 2)
    fmt = ReplyFormat(harmony=True)
    schema = random_object_schema(rng)
    for must_call in (True, False):
        grammar = reply_grammar(grammars, fmt, schema, json_answer=not must_call,
                                tools=offered, must_call=must_call)  # fmt: skip
        assert grammar is not None
        for _ in range(10):
            text = walk(grammars.matcher(grammar), rng, tokenizer)
            stream = HarmonyStream()
            _, content = stream.feed(text)
            tail = stream.finish()[1]
            if must_call or stream.calls:
                check_calls(stream.calls, offered, text)
            else:
                jsonschema.validate(json.loads(content + tail), schema)


def test_a_named_format_without_a_grammar_is_refused(plain: GrammarTokenizer) -> None:
    fmt = ReplyFormat(tool_call_open="<|tool_call>")
    with pytest.raises(GrammarError, match="tool_choice 'auto'"):
        reply_grammar(plain, fmt, tools=[ToolSpec("f")], must_call=True)


def test_no_constraint_without_a_json_answer_or_a_forced_call(plain: GrammarTokenizer) -> None:
    assert reply_grammar(plain, ReplyFormat(), tools=[ToolSpec("f")]) is None
    with pytest.raises(GrammarError, match="no tools"):
        reply_grammar(plain, ReplyFormat(), must_call=True)


def test_tool_specs_name_the_bad_entry() -> None:
    good = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert tool_specs([good])[0].name == "f"
    with pytest.raises(GrammarError, match=r"tools\[1\] needs function.name"):
        tool_specs([good, {"type": "function", "function": {}}])
    with pytest.raises(GrammarError, match=r"tools\[0\].function.parameters"):
        tool_specs([{"function": {"name": "f", "parameters": [1]}}])
