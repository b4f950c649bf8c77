"""Tool calls in generated text, whole or as it streams.

Two formats: ``<tool_call>{json}</tool_call>`` (Qwen, Hermes) and Gemma 4's
``<|tool_call>call:NAME{key:value,...}<tool_call|>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str) -> tuple[str, list[ParsedToolCall]]:
    """Split model output into its plain content and the tool calls it makes.

    Each call is a JSON object with ``name`` and ``arguments`` between the tags. A block that is
    not valid JSON, or has no name, stays in the content as text.
    """
    content: list[str] = []
    calls: list[ParsedToolCall] = []
    rest = text
    while True:
        start = rest.find(TOOL_CALL_OPEN)
        if start < 0:
            content.append(rest)
            break
        end = rest.find(TOOL_CALL_CLOSE, start)
        body = rest[start + len(TOOL_CALL_OPEN) : end if end >= 0 else len(rest)]
        after = rest[end + len(TOOL_CALL_CLOSE) :] if end >= 0 else ""
        try:
            payload = json.loads(body)
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("name"), str):
            arguments = payload.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    arguments = {"value": arguments}
            calls.append(ParsedToolCall(payload["name"], arguments if isinstance(arguments, dict)
                                        else {"value": arguments}))  # fmt: skip
            content.append(rest[:start])
        else:
            content.append(rest[: end + len(TOOL_CALL_CLOSE)] if end >= 0 else rest)
            if end < 0:
                break
        rest = after
    return "".join(content).strip(), calls


class ToolCallSplitter:
    """Streams content until a tool-call block starts; keeps the rest for parsing at the end."""

    def __init__(self, open_tag: str = TOOL_CALL_OPEN) -> None:
        self.open_tag = open_tag
        self.held = ""
        self.tail = ""
        self.in_call = False

    def feed(self, delta: str) -> str:
        if self.in_call:
            self.tail += delta
            return ""
        text = self.held + delta
        start = text.find(self.open_tag)
        if start >= 0:
            self.in_call, self.held, self.tail = True, "", text[start:]
            return text[:start]
        keep = next((n for n in range(len(self.open_tag) - 1, 0, -1)
                     if text.endswith(self.open_tag[:n])), 0)  # fmt: skip
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        held, self.held = self.held, ""
        return held


GEMMA_OPEN, GEMMA_CLOSE, GEMMA_QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


def _gemma_value(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _gemma_arguments(body: str) -> dict[str, Any]:
    """``key:value,key:<|"|>text<|"|>`` -> a dict (strings between the quote tokens verbatim)."""
    arguments: dict[str, Any] = {}
    rest = body
    while rest.strip():
        colon = rest.find(":")
        if colon < 0:
            break
        key, rest = rest[:colon].strip().lstrip(","), rest[colon + 1 :]
        if rest.startswith(GEMMA_QUOTE):
            end = rest.find(GEMMA_QUOTE, len(GEMMA_QUOTE))
            end = len(rest) if end < 0 else end
            arguments[key] = rest[len(GEMMA_QUOTE) : end]
            rest = rest[end + len(GEMMA_QUOTE) :].lstrip(",")
            continue
        depth, cut = 0, len(rest)
        for i, ch in enumerate(rest):
            depth += ch in "[{"
            depth -= ch in "]}"
            if ch == "," and depth == 0:
                cut = i
                break
        arguments[key] = _gemma_value(rest[:cut])
        rest = rest[cut + 1 :]
    return arguments


def parse_gemma_tool_calls(text: str) -> tuple[str, list[ParsedToolCall]]:
    """Gemma 4's ``<|tool_call>call:NAME{key:value,...}<tool_call|>`` blocks."""
    content: list[str] = []
    calls: list[ParsedToolCall] = []
    rest = text
    while (start := rest.find(GEMMA_OPEN)) >= 0:
        end = rest.find(GEMMA_CLOSE, start)
        block = rest[start + len(GEMMA_OPEN) : end if end >= 0 else len(rest)].strip()
        content.append(rest[:start])
        rest = rest[end + len(GEMMA_CLOSE) :] if end >= 0 else ""
        if block.startswith("call:") and "{" in block and block.endswith("}"):
            name, _, body = block[len("call:") :].partition("{")
            calls.append(ParsedToolCall(name.strip(), _gemma_arguments(body[:-1])))
        else:
            content.append(GEMMA_OPEN + block + (GEMMA_CLOSE if end >= 0 else ""))
    content.append(rest)
    return "".join(content).strip(), calls
