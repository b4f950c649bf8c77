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
from mach.decode.stopping import StopMatcher
from mach.decode.tool_calls import ParsedToolCall
from mach.tokenizer.detokenizer import StreamingDetokenizer
from mach.tokenizer.tokenizer import Tokenizer
from mach_serve.responses import ToolCallSplitter


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""


class ChatOutput(ABC):
    """Feed token events; get reasoning and content deltas, then the tool calls at the end.

    Output is decoded again with special tokens kept (tool-call and channel markers may be
    special tokens), and the request's stop strings are applied to that text.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.calls: list[ParsedToolCall] = []
        self._detok = StreamingDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        )
        self._stops = StopMatcher(stops)

    def raw(self, event: TokenEvent) -> str:
        """The text this event adds, special tokens kept, stop strings applied."""
        return self._stops.feed(self._detok.add_token(event.token)) if event.token is not None \
            else ""  # fmt: skip

    def raw_tail(self) -> str:
        return self._stops.feed(self._detok.finalize()) + self._stops.flush()

    @abstractmethod
    def feed(self, event: TokenEvent) -> Delta:
        """The reasoning and content this event completes."""

    @abstractmethod
    def finish(self) -> Delta:
        """What was held back, once the output has ended; ``calls`` is final after this."""


class TaggedOutput(ChatOutput):
    def __init__(self, adapter: MoeArchAdapter, tokenizer: Tokenizer, tags: ReasoningTags | None,
                 thinking: bool, tools: bool, stops: list[str]) -> None:  # fmt: skip
        super().__init__(tokenizer, stops)
        self.adapter = adapter
        self.thoughts = ReasoningSplitter(tags, started=thinking) if tags is not None else None
        self.splitter = ToolCallSplitter(adapter.tool_call_open) if tools else None

    def _route(self, reasoning: str, text: str) -> Delta:
        if self.splitter is not None:
            text = self.splitter.feed(text)
        return Delta(reasoning, text)

    def _text(self, text: str) -> Delta:
        if self.thoughts is None:
            return self._route("", text)
        return self._route(*self.thoughts.feed(text))

    def feed(self, event: TokenEvent) -> Delta:
        return self._text(self.raw(event))

    def finish(self) -> Delta:
        delta = self._text(self.raw_tail())
        reasoning, text = self.thoughts.finish() if self.thoughts is not None else ("", "")
        tail = self._route(reasoning, text)
        delta = Delta(delta.reasoning + tail.reasoning, delta.content + tail.content)
        if self.splitter is not None:
            delta.content += self.splitter.finish()
            if self.splitter.tail:
                rest, self.calls = self.adapter.parse_tool_calls(self.splitter.tail)
                delta.content += rest
        return delta


class HarmonyOutput(ChatOutput):
    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        super().__init__(tokenizer, stops)
        self.stream = HarmonyStream()

    def feed(self, event: TokenEvent) -> Delta:
        return Delta(*self.stream.feed(self.raw(event)))

    def finish(self) -> Delta:
        reasoning, content = self.stream.feed(self.raw_tail())
        tail_reasoning, tail_content = self.stream.finish()
        self.calls = self.stream.calls
        return Delta(reasoning + tail_reasoning, content + tail_content)


def chat_output(adapter: MoeArchAdapter, tokenizer: Tokenizer, prompt_text: str,
                tools: bool, stops: list[str] | None = None) -> ChatOutput:  # fmt: skip
    """The splitter for this checkpoint's output format."""
    stops = list(stops or [])
    if "<|channel|>" in (tokenizer.chat_template or ""):
        return HarmonyOutput(tokenizer, stops)
    tags = adapter.reasoning_tags
    thinking = tags is not None and prompt_text.rstrip().endswith(tags.open)
    return TaggedOutput(adapter, tokenizer, tags, thinking, tools, stops)
