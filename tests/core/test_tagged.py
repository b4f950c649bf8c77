"""Tagged output: ``<think>`` reasoning, then the answer, then tool-call blocks, as it streams."""

from __future__ import annotations

import pytest

from mach.chat.reasoning import ReasoningTags
from mach.chat.tagged import TaggedStream
from mach.chat.tool_calls import parse_gemma_tool_calls

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def _run(stream: TaggedStream, text: str, cut: int) -> tuple[str, str]:
    parts = [stream.feed(text[i : i + cut]) for i in range(0, len(text), cut)]
    parts.append(stream.finish())
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


@pytest.mark.parametrize("cut", [1, 4, 9, 200])
def test_reasoning_content_and_call(cut: int) -> None:
    stream = TaggedStream(ReasoningTags(), tools=True)
    assert _run(stream, f"<think>add them</think>Adding.{CALL}", cut) == ("add them", "Adding.")
    assert [(c.name, c.arguments) for c in stream.calls] == [("add", {"a": 2, "b": 3})]


def test_prompt_opened_reasoning() -> None:
    stream = TaggedStream(ReasoningTags(), thinking=True)
    assert _run(stream, "weigh it</think>5", 2) == ("weigh it", "5")


def test_without_tools_a_call_stays_content() -> None:
    stream = TaggedStream()
    assert _run(stream, f"Adding.{CALL}", 3) == ("", f"Adding.{CALL}")
    assert stream.calls == []


def test_family_format() -> None:
    text = "Sure.<|tool_call>call:add{a:2,b:3}<tool_call|>"
    stream = TaggedStream(tools=True, tool_call_open="<|tool_call>", parse=parse_gemma_tool_calls)
    assert _run(stream, text, 5) == ("", "Sure.")
    assert [(c.name, c.arguments) for c in stream.calls] == [("add", {"a": 2, "b": 3})]
