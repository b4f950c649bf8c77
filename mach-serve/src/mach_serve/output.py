"""Splitting a chat model's output into reasoning, answer and tool calls, as it streams.

Two formats: tagged text (``<think>`` reasoning and ``<tool_call>`` JSON blocks, as Qwen models
write them) and harmony channels (gpt-oss), chosen from the checkpoint's chat template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from mach.adapter import MoeArchAdapter
from mach.decode.events import TokenEvent
from mach.decode.harmony import HarmonyStream
from mach.decode.reasoning import ReasoningSplitter, ReasoningTags
from mach.decode.tool_calls import ParsedToolCall
from mach.tokenizer.detokenizer import StreamingDetokenizer
from mach.tokenizer.tokenizer import Tokenizer
from mach_serve.responses import ToolCallSplitter


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""


class ChatOutput(ABC):
    """Feed token events; get reasoning and content deltas, then the tool calls at the end."""

    def __init__(self) -> None:
        self.calls: list[ParsedToolCall] = []

    @abstractmethod
    def feed(self, event: TokenEvent) -> Delta:
        """The reasoning and content this event completes."""

    @abstractmethod
    def finish(self) -> Delta:
        """What was held back, once the output has ended; ``calls`` is final after this."""


class TaggedOutput(ChatOutput):
    def __init__(self, adapter: MoeArchAdapter, tags: ReasoningTags | None, thinking: bool,
                 tools: bool) -> None:  # fmt: skip
        super().__init__()
        self.adapter = adapter
        self.thoughts = ReasoningSplitter(tags, started=thinking) if tags is not None else None
        self.splitter = ToolCallSplitter() if tools else None

    def _route(self, reasoning: str, text: str) -> Delta:
        if self.splitter is not None:
            text = self.splitter.feed(text)
        return Delta(reasoning, text)

    def feed(self, event: TokenEvent) -> Delta:
        if self.thoughts is None:
            return self._route("", event.text)
        return self._route(*self.thoughts.feed(event.text))

    def finish(self) -> Delta:
        reasoning, text = self.thoughts.finish() if self.thoughts is not None else ("", "")
        delta = self._route(reasoning, text)
        if self.splitter is not None:
            delta.content += self.splitter.finish()
            if self.splitter.tail:
                rest, self.calls = self.adapter.parse_tool_calls(self.splitter.tail)
                delta.content += rest
        return delta


class HarmonyOutput(ChatOutput):
    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        # Harmony's structure lives in special tokens, so they are decoded too.
        self.detok = StreamingDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        )
        self.stream = HarmonyStream()

    def feed(self, event: TokenEvent) -> Delta:
        if event.token is None:
            return Delta()
        return Delta(*self.stream.feed(self.detok.add_token(event.token)))

    def finish(self) -> Delta:
        reasoning, content = self.stream.feed(self.detok.finalize())
        tail_reasoning, tail_content = self.stream.finish()
        self.calls = self.stream.calls
        return Delta(reasoning + tail_reasoning, content + tail_content)


def chat_output(adapter: MoeArchAdapter, tokenizer: Tokenizer, prompt_text: str,
                tools: bool) -> ChatOutput:  # fmt: skip
    """The splitter for this checkpoint's output format."""
    if "<|channel|>" in (tokenizer.chat_template or ""):
        return HarmonyOutput(tokenizer)
    tags = adapter.reasoning_tags
    thinking = tags is not None and prompt_text.rstrip().endswith(tags.open)
    return TaggedOutput(adapter, tags, thinking, tools)
