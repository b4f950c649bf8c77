"""Structured output through the official client: response_format and tool_choice hold."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from tests.random_schemas import random_object_schema
from tests.serve.conftest import Running

ASK = [{"role": "user", "content": "Describe the os module as JSON."}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "days": {"type": "integer", "minimum": 1,
                                                     "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}},
]  # fmt: skip


@pytest.fixture
def client(served: Running) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}  # fmt: skip


def test_json_object_gives_an_object(client: OpenAI, served: Running) -> None:
    reply = client.chat.completions.create(
        model=served.state.model_id, messages=ASK, max_tokens=300, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content or ""), dict)


def test_100_random_schemas_all_validate(served: Running) -> None:
    """Sampled at temperature 1, concurrently (the batch decodes them together)."""
    rng = random.Random(7)
    schemas = [random_object_schema(rng) for _ in range(100)]

    def ask(case: int) -> tuple[int, str, str]:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=served.state.model_id, messages=ASK, max_tokens=400, temperature=1.0,
            seed=case, response_format=schema_format(schemas[case]),
        )  # fmt: skip
        return case, reply.choices[0].finish_reason, reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        for case, finish, text in pool.map(ask, range(100)):
            assert finish == "stop", f"case {case}: {finish} {text!r}"
            jsonschema.validate(json.loads(text), schemas[case])


def test_streamed_json_equals_the_whole_reply(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "messages": ASK, "max_tokens": 200,
            "temperature": 0, "response_format": schema_format(WEATHER)}  # fmt: skip
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **args)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole or ""), WEATHER)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_choice_always_calls(client: OpenAI, served: Running,
                                           temperature: float) -> None:  # fmt: skip
    for seed in range(3):
        reply = client.chat.completions.create(
            model=served.state.model_id, messages=ASK, tools=TOOLS, tool_choice="required",
            max_tokens=200, temperature=temperature, seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        for call in choice.message.tool_calls or []:
            arguments = json.loads(call.function.arguments)
            schema = next(t["function"]["parameters"] for t in TOOLS
                          if t["function"]["name"] == call.function.name)  # fmt: skip
            jsonschema.validate(arguments, schema)


def test_a_named_tool_is_the_one_called(client: OpenAI, served: Running) -> None:
    reply = client.chat.completions.create(
        model=served.state.model_id, messages=ASK, tools=TOOLS, max_tokens=200, temperature=1,
        seed=1, tool_choice={"type": "function", "function": {"name": "forecast"}},
    )  # fmt: skip
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["forecast"]
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


def test_streamed_forced_call(client: OpenAI, served: Running) -> None:
    chunks = list(client.chat.completions.create(
        model=served.state.model_id, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "now"}}, stream=True,
    ))  # fmt: skip
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["now"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema", "json_schema.schema"),
        ({"response_format": schema_format({"type": "object", "properties": {"a": {
            "type": "strnig"}}})}, "response_format", "strnig"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope', which is not in tools"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "must be"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}],
          "tool_choice": "required"}, "tool_choice", r"tools\[0\] needs function.name"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(served: Running, extra: dict[str, Any],
                                                    param: str, words: str) -> None:  # fmt: skip
    body = {"messages": ASK, "max_tokens": 4, **extra}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert re.search(words, error["message"]), error


def test_the_client_library_raises_on_a_bad_schema(client: OpenAI, served: Running) -> None:
    with pytest.raises(BadRequestError, match="strnig"):
        client.chat.completions.create(
            model=served.state.model_id, messages=ASK, max_tokens=4,
            response_format=schema_format({"type": "strnig"}),
        )  # fmt: skip


def test_capabilities_list_what_is_enforced(served: Running) -> None:
    server = httpx.get(f"{served.url}/v1/capabilities", timeout=10).json()["server"]
    assert server["response_format"] == ["text", "json_object", "json_schema"]
    assert server["tool_choice"] == ["none", "auto", "required", "function"]


def test_the_grammar_tokenizer_is_built_before_the_first_request() -> None:
    from mach.decode.grammar import GrammarTokenizer
    from mach_serve import build_state

    state = build_state(None)
    try:
        assert state.tokenizer in GrammarTokenizer._built
    finally:
        state.worker.shutdown()
