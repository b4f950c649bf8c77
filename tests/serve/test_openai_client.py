"""The official openai client against a real server: chat, completions, streaming, tools."""

from __future__ import annotations

import json
import logging

import pytest
from openai import OpenAI

from tests.serve.conftest import Running

PROMPT = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture
def client(served: Running) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client: OpenAI, served: Running) -> None:
    assert [m.id for m in client.models.list().data] == [served.state.model_id]


def test_chat_non_streaming(client: OpenAI, served: Running) -> None:
    reply = client.chat.completions.create(
        model=served.state.model_id, messages=PROMPT, max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "messages": PROMPT, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**args).choices[0].message.content
    parts, usage, finish = [], None, None
    for event in client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == whole
    assert usage is not None and usage.completion_tokens > 0 and finish in ("stop", "length")


def test_completions_sync_and_streaming(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "prompt": "def fibonacci(n):", "max_tokens": 16,
            "temperature": 0}  # fmt: skip
    text = client.completions.create(**args).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True)
                       if c.choices)  # fmt: skip
    assert text and streamed == text


def test_seeded_sampling_repeats(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "messages": PROMPT, "max_tokens": 16,
            "temperature": 0.9, "top_p": 0.95, "seed": 11}  # fmt: skip
    first = client.chat.completions.create(**args).choices[0].message.content
    assert client.chat.completions.create(**args).choices[0].message.content == first


def test_logprobs(client: OpenAI, served: Running) -> None:
    reply = client.chat.completions.create(
        model=served.state.model_id, messages=PROMPT, max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6


def test_stop_sequence(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "prompt": "import os\n", "max_tokens": 24,
            "temperature": 0}  # fmt: skip
    free = client.completions.create(**args).choices[0].text
    stop = free.strip()[:3]
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text


TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}}}}}]  # fmt: skip


def test_tool_call_round_trip(client: OpenAI, served: Running) -> None:
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]  # fmt: skip
    reply = client.chat.completions.create(
        model=served.state.model_id, messages=messages, tools=TOOLS, max_tokens=12,
        temperature=0,
    )  # fmt: skip
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt_with_tools = reply.usage.prompt_tokens
    plain = client.chat.completions.create(
        model=served.state.model_id, messages=messages, max_tokens=1, temperature=0
    )
    assert prompt_with_tools > plain.usage.prompt_tokens  # the tool schema reached the template


def test_chat_stop_sequence_is_not_returned(client: OpenAI, served: Running) -> None:
    args = {"model": served.state.model_id, "messages": PROMPT, "max_tokens": 24,
            "temperature": 0}  # fmt: skip
    free = client.chat.completions.create(**args).choices[0].message.content
    stop = free.strip()[2:5]
    assert stop
    cut = client.chat.completions.create(**args, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in (cut.message.content or "")
    streamed = "".join(e.choices[0].delta.content or "" for e in client.chat.completions.create(
        **args, stop=[stop], stream=True) if e.choices)  # fmt: skip
    assert stop not in streamed and streamed == (cut.message.content or "")


def test_models_retrieve(client: OpenAI, served: Running) -> None:
    import openai

    assert client.models.retrieve(served.state.model_id).id == served.state.model_id
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("someone-else")
    assert "someone-else" in str(missing.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 9.0), ("temperature", -0.5), ("top_p", 1.5), ("presence_penalty", 3.0),
     ("frequency_penalty", -2.5)],
)  # fmt: skip
def test_sampling_ranges_match_openai(
    client: OpenAI, served: Running, field: str, value: float
) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=served.state.model_id, messages=PROMPT, max_tokens=4, **{field: value}
        )  # type: ignore[call-overload]
    assert bad.value.body is not None and bad.value.body["param"] == field  # type: ignore[index]


def test_each_finished_request_logs_one_line(
    client: OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mach_serve")
    client.completions.create(model="default", prompt="def add(a, b):", max_tokens=5,
                              temperature=0)  # fmt: skip
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    list(stream)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request done")]
    assert len(lines) == 2, lines
    assert "5 generated" in lines[0] and "finish length" in lines[0]
    assert "prompt tokens" in lines[1] and "tok/s" in lines[1]
