"""OpenAI's harmony output format (gpt-oss): channels split into reasoning, answer and tool calls.

An assistant turn is one or more messages, each ``<|channel|>NAME[ to=RECIPIENT][<|constrain|>
FORMAT]<|message|>BODY`` ended by ``<|end|>``, ``<|return|>`` or ``<|call|>``, the next one
opened by ``<|start|>assistant``. ``analysis`` is reasoning, ``final`` the answer, and a
``commentary`` message addressed ``to=functions.NAME`` is a tool call whose body is its JSON
arguments.
"""

from __future__ import annotations

import json
import re

from mach.chat.tool_calls import ParsedToolCall

ENDS = ("<|end|>", "<|return|>", "<|call|>")
MESSAGE = "<|message|>"
_HEADER = re.compile(r"<\|channel\|>\s*(\w+)(?:\s+to=([\w.\-]+))?")


def _call(recipient: str, body: str) -> ParsedToolCall | None:
    if not recipient.startswith("functions."):
        return None
    try:
        arguments = json.loads(body) if body.strip() else {}
    except json.JSONDecodeError:
        arguments = {"value": body}
    if not isinstance(arguments, dict):
        arguments = {"value": arguments}
    return ParsedToolCall(recipient.removeprefix("functions."), arguments)


class HarmonyStream:
    """Feed raw decoded text (special tokens kept); get reasoning and content deltas."""

    def __init__(self) -> None:
        self.buffer = ""
        self.channel: str | None = None
        self.recipient: str | None = None
        self.body = ""
        self.calls: list[ParsedToolCall] = []

    def _emit(self, text: str) -> tuple[str, str]:
        if not text:
            return "", ""
        if self.recipient:
            self.body += text
            return "", ""
        return (text, "") if self.channel == "analysis" else ("", text)

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        reasoning = content = ""
        while self.buffer:
            if self.channel is None:
                start = self.buffer.find(MESSAGE)
                if start < 0:
                    return reasoning, content
                header = _HEADER.search(self.buffer[:start])
                self.channel = header.group(1) if header else "final"
                self.recipient = header.group(2) if header else None
                self.buffer = self.buffer[start + len(MESSAGE) :]
                self.body = ""
                continue
            ends = [(self.buffer.find(e), e) for e in ENDS if e in self.buffer]
            if ends:
                pos, end = min(ends)
                r, c = self._emit(self.buffer[:pos])
                reasoning, content = reasoning + r, content + c
                self._close()
                self.buffer = self.buffer[pos + len(end) :]
                continue
            # Hold back a special token that has started but not finished arriving.
            keep = self.buffer.rfind("<")
            tail = self.buffer[keep:] if keep >= 0 else ""
            if not (tail == "<" or (tail.startswith("<|") and "|>" not in tail)):
                keep = -1
            ready = self.buffer if keep < 0 else self.buffer[:keep]
            r, c = self._emit(ready)
            reasoning, content = reasoning + r, content + c
            self.buffer = "" if keep < 0 else self.buffer[keep:]
            return reasoning, content
        return reasoning, content

    def _close(self) -> None:
        if self.recipient:
            call = _call(self.recipient, self.body)
            if call is not None:
                self.calls.append(call)
        self.channel = self.recipient = None
        self.body = ""

    def finish(self) -> tuple[str, str]:
        """End of output: flush what is held and close an unterminated message."""
        reasoning = content = ""
        if self.channel is not None:
            reasoning, content = self._emit(self.buffer)
            self._close()
        self.buffer = ""
        return reasoning, content


def parse_harmony(text: str) -> tuple[str, str, list[ParsedToolCall]]:
    """``(reasoning, content, tool_calls)`` of a complete harmony output."""
    stream = HarmonyStream()
    r1, c1 = stream.feed(text)
    r2, c2 = stream.finish()
    return r1 + r2, c1 + c2, stream.calls
