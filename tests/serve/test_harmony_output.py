"""Harmony output (gpt-oss) through the server: channels become reasoning, content, tool calls.

Scripted checkpoints (tests/serve/scripted.py) with harmony's special tokens and a harmony chat
template answer with one message each: a final answer, an analysis, a tool call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.serve.conftest import Running, serve_with
from tests.serve.scripted import scripted_checkpoint

SPECIALS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
            "<|call|>")  # fmt: skip
TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
ANSWERS = {
    "final": ("<|channel|>final<|message|>5", "<|return|>"),
    "analysis": ("<|channel|>analysis<|message|>sum", "<|return|>"),
    "call": ('<|channel|>commentary to=functions.add<|constrain|>json<|message|>{"a":2}',
             "<|call|>"),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(ANSWERS))
def harmony(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[str, Running]
]:  # fmt: skip
    text, end = ANSWERS[request.param]
    root: Path = tmp_path_factory.mktemp(request.param) / "model"
    scripted_checkpoint(root, text, MESSAGES, specials=SPECIALS, template=TEMPLATE, end=end)
    for running in serve_with(model=str(root), model_name="h"):
        yield request.param, running


def test_channels_come_back_apart(harmony: tuple[str, Running]) -> None:
    kind, running = harmony
    client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    args = {"model": "h", "messages": MESSAGES, "temperature": 0, "max_tokens": 32,
            "tools": TOOLS}  # fmt: skip
    choice = client.chat.completions.create(**args).choices[0]
    reasoning = (choice.message.model_extra or {}).get("reasoning_content")
    streamed = {"reasoning": "", "content": "", "calls": [], "finish": None}
    for event in client.chat.completions.create(**args, stream=True):
        for c in event.choices:
            streamed["reasoning"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
            streamed["content"] += c.delta.content or ""
            streamed["calls"] += c.delta.tool_calls or []
            streamed["finish"] = c.finish_reason or streamed["finish"]
    if kind == "final":
        assert choice.message.content == "5" and not reasoning
        assert (streamed["content"], streamed["reasoning"]) == ("5", "")
    elif kind == "analysis":
        assert reasoning == "sum" and not choice.message.content
        assert (streamed["content"], streamed["reasoning"]) == ("", "sum")
    else:
        assert choice.finish_reason == "tool_calls" and streamed["finish"] == "tool_calls"
        call = choice.message.tool_calls[0].function
        assert call.name == "add" and json.loads(call.arguments) == {"a": 2}
        assert [c.function.name for c in streamed["calls"]] == ["add"]
