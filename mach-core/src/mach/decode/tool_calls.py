"""Tool calls in generated text: the ``<tool_call>{json}</tool_call>`` format (Qwen, Hermes)."""

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
