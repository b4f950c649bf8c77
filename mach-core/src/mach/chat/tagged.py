"""Tagged output (Qwen, Gemma): ``<think>`` reasoning, then the answer, then tool-call blocks."""

from __future__ import annotations

from collections.abc import Callable

from mach.chat.reasoning import ReasoningSplitter, ReasoningTags
from mach.chat.tool_calls import TOOL_CALL_OPEN, ParsedToolCall, ToolCallSplitter, parse_tool_calls


class TaggedStream:
    """Feed decoded text (special tokens kept); get reasoning and content deltas, then the calls.

    ``tags`` marks reasoning (``None``: the family has none) and ``thinking`` says the prompt
    already opened it. With ``tools``, content streams until ``tool_call_open`` and what follows
    is handed to ``parse`` once the output ends.
    """

    def __init__(
        self,
        tags: ReasoningTags | None = None,
        thinking: bool = False,
        tools: bool = False,
        tool_call_open: str = TOOL_CALL_OPEN,
        parse: Callable[[str], tuple[str, list[ParsedToolCall]]] = parse_tool_calls,
    ) -> None:
        self.thoughts = ReasoningSplitter(tags, started=thinking) if tags is not None else None
        self.splitter = ToolCallSplitter(tool_call_open) if tools else None
        self.parse = parse
        self.calls: list[ParsedToolCall] = []

    def _route(self, reasoning: str, text: str) -> tuple[str, str]:
        if self.splitter is not None:
            text = self.splitter.feed(text)
        return reasoning, text

    def feed(self, delta: str) -> tuple[str, str]:
        if self.thoughts is None:
            return self._route("", delta)
        return self._route(*self.thoughts.feed(delta))

    def finish(self) -> tuple[str, str]:
        """End of output: flush what is held; ``calls`` is final after this."""
        reasoning, content = "", ""
        if self.thoughts is not None:
            reasoning, content = self._route(*self.thoughts.finish())
        if self.splitter is not None:
            content += self.splitter.finish()
            if self.splitter.tail:
                rest, self.calls = self.parse(self.splitter.tail)
                content += rest
        return reasoning, content
