"""The harmony output format: channels into reasoning, answer and tool calls."""

from __future__ import annotations

import pytest

from mach.chat.harmony import HarmonyStream, parse_harmony

FULL = ("<|channel|>analysis<|message|>User wants a sum.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 5.<|return|>")  # fmt: skip
CALL = ("<|channel|>analysis<|message|>Use the tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.add <|constrain|>json"
        '<|message|>{"a": 2, "b": 3}<|call|>')  # fmt: skip


def test_reasoning_and_answer() -> None:
    assert parse_harmony(FULL) == ("User wants a sum.", "It is 5.", [])


def test_tool_call() -> None:
    reasoning, content, calls = parse_harmony(CALL)
    assert reasoning == "Use the tool." and content == ""
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 2, "b": 3})]


def test_unterminated_final_message() -> None:
    assert parse_harmony("<|channel|>final<|message|>partial") == ("", "partial", [])


@pytest.mark.parametrize("cut", [1, 2, 5, 11])
def test_streamed_equals_whole(cut: int) -> None:
    for text in (FULL, CALL):
        stream = HarmonyStream()
        parts = [stream.feed(text[i : i + cut]) for i in range(0, len(text), cut)]
        parts.append(stream.finish())
        whole = parse_harmony(text)
        assert "".join(r for r, _ in parts) == whole[0]
        assert "".join(c for _, c in parts) == whole[1]
        assert [(c.name, c.arguments) for c in stream.calls] == [
            (c.name, c.arguments) for c in whole[2]
        ]
