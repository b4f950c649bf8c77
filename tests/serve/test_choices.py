"""``n`` choices per request: each its own sequence, seeded apart, streamed interleaved."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import OpenAI

from tests.serve.conftest import Running

ASK = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture
def client(served: Running) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_chat_choices_are_sampled_apart(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "messages": ASK, "max_tokens": 16,
            "temperature": 1.0, "seed": 11}  # fmt: skip
    reply = client.chat.completions.create(n=4, **args)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1
    # Choice 0 is the request's own seed; choice i draws with seed + i.
    single = client.chat.completions.create(**args).choices[0].message.content
    assert texts[0] == single
    third = client.chat.completions.create(**{**args, "seed": 13}).choices[0].message.content
    assert texts[2] == third
    assert reply.usage.completion_tokens == sum(
        client.chat.completions.create(**{**args, "seed": 11 + i}).usage.completion_tokens
        for i in range(4)
    )
    assert reply.usage.prompt_tokens == client.chat.completions.create(**args).usage.prompt_tokens


def test_greedy_choices_agree(client: OpenAI, served: Running) -> None:
    reply = client.chat.completions.create(model=served.state.model_id, messages=ASK, n=3,
                                           max_tokens=12, temperature=0)  # fmt: skip
    assert len({c.message.content for c in reply.choices}) == 1


def test_streamed_choices_equal_the_whole_reply(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "messages": ASK, "max_tokens": 16, "n": 3,
            "temperature": 1.0, "seed": 5}  # fmt: skip
    whole = client.chat.completions.create(**args)
    texts = ["", "", ""]
    finishes: dict[int, str] = {}
    usage = None
    for piece in client.chat.completions.create(stream=True, stream_options={
            "include_usage": True}, **args):  # fmt: skip
        if piece.usage is not None:
            usage = piece.usage
        for c in piece.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert sorted(finishes) == [0, 1, 2]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_choices(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "prompt": "import os\n", "max_tokens": 8,
            "temperature": 1.0, "seed": 2, "n": 2}  # fmt: skip
    whole = client.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1]
    texts = ["", ""]
    for piece in client.completions.create(stream=True, **args):
        for c in piece.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]


def test_structured_choices_all_validate(client: OpenAI, served: Running) -> None:
    reply = client.chat.completions.create(
        model=served.state.model_id, messages=ASK, n=4, max_tokens=200, temperature=1.0,
        seed=3, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"v": {"type": "integer", "minimum": 0,
                                                   "maximum": 9}},
            "required": ["v"], "additionalProperties": False}}},
    )  # fmt: skip
    assert all(0 <= json.loads(c.message.content or "")["v"] <= 9 for c in reply.choices)


def test_a_client_leaving_cancels_every_choice(served: Running) -> None:
    before = served.state.metrics.outcomes["cancelled"]
    body = {"messages": ASK, "max_tokens": 400, "n": 3, "stream": True, "temperature": 1}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      timeout=30) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = 100
    while served.state.worker.depth and deadline:
        time.sleep(0.05)
        deadline -= 1
    assert served.state.worker.depth == 0
    assert served.state.metrics.outcomes["cancelled"] == before + 1
