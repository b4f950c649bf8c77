"""A tool call parsed from real model output, end to end through the openai client.

The model is a scripted checkpoint (tests/serve/scripted.py) that answers with a ``<tool_call>``
block; each token may appear once in its chain, so the call leaves ``arguments`` out (the parser
then reads them as empty).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.serve.conftest import Running, serve_with
from tests.serve.scripted import scripted_checkpoint

CALL = '<tool_call> {"name": "add"}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "model", CALL, MESSAGES,
                               TOOLS)  # fmt: skip
    yield from serve_with(model=str(root), model_name="scripted")


def test_tool_call_is_parsed_from_model_output(scripted: Running) -> None:
    client = OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0)
    args = {"model": "scripted", "messages": MESSAGES, "temperature": 0, "max_tokens": 64}
    reply = client.chat.completions.create(**args, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    call = choice.message.tool_calls[0]
    assert call.function.name == "add" and json.loads(call.function.arguments) == {}
    assert call.id and call.type == "function"

    calls, finish, content = [], None, ""
    for event in client.chat.completions.create(**args, tools=TOOLS, stream=True):
        for c in event.choices:
            calls += c.delta.tool_calls or []
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert [c.function.name for c in calls] == ["add"]

    # Without tools the same text comes back as plain content.
    plain = client.chat.completions.create(**args).choices[0]
    assert plain.finish_reason == "stop" and plain.message.content == CALL
