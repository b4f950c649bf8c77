"""A chat model's token events as reasoning, answer and tool-call deltas, as they stream.

The text is split by ``mach.chat``: harmony channels (gpt-oss) when the checkpoint's chat
template uses them, tagged text (``<think>`` reasoning and tool-call blocks) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from mach.adapter import MoeArchAdapter
from mach.chat.harmony import HarmonyStream
from mach.chat.tagged import TaggedStream
from mach.chat.tool_calls import ParsedToolCall
from mach.decode.events import TokenEvent
from mach.decode.stopping import StopMatcher
from mach.decode.structured import reply_format
from mach.tokenizer.detokenizer import StreamingDetokenizer
from mach.tokenizer.tokenizer import Tokenizer


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""


class ChatOutput:
    """Feed token events; get reasoning and content deltas, then the tool calls at the end.

    Output is decoded again with special tokens kept (tool-call and channel markers may be
    special tokens), and the request's stop strings are applied to that text.
    """

    def __init__(self, tokenizer: Tokenizer, stream: HarmonyStream | TaggedStream,
                 stops: list[str]) -> None:  # fmt: skip
        self.stream = stream
        self._detok = StreamingDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        )
        self._stops = StopMatcher(stops)

    @property
    def calls(self) -> list[ParsedToolCall]:
        return self.stream.calls

    def raw(self, event: TokenEvent) -> str:
        """The text this event adds, special tokens kept, stop strings applied."""
        return self._stops.feed(self._detok.add_token(event.token)) if event.token is not None \
            else ""  # fmt: skip

    def raw_tail(self) -> str:
        return self._stops.feed(self._detok.finalize()) + self._stops.flush()

    def feed(self, event: TokenEvent) -> Delta:
        """The reasoning and content this event completes."""
        return Delta(*self.stream.feed(self.raw(event)))

    def finish(self) -> Delta:
        """What was held back, once the output has ended; ``calls`` is final after this."""
        reasoning, content = self.stream.feed(self.raw_tail())
        tail_reasoning, tail_content = self.stream.finish()
        return Delta(reasoning + tail_reasoning, content + tail_content)


def chat_output(adapter: MoeArchAdapter, tokenizer: Tokenizer, prompt_text: str,
                tools: bool, stops: list[str] | None = None) -> ChatOutput:  # fmt: skip
    """The splitter for this checkpoint's output format."""
    fmt = reply_format(adapter, tokenizer.chat_template, prompt_text)
    stream: HarmonyStream | TaggedStream
    if fmt.harmony:
        stream = HarmonyStream()
    else:
        stream = TaggedStream(fmt.reasoning, fmt.reasoning_started, tools, fmt.tool_call_open,
                              adapter.parse_tool_calls)  # fmt: skip
    return ChatOutput(tokenizer, stream, list(stops or []))
