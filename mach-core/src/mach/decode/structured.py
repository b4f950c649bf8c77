"""Grammars for a chat reply's shape: a JSON answer, or calls to the offered tools.

A reply is written in its checkpoint's format, so each grammar allows what that format puts
around the answer: harmony's channels (gpt-oss) or tagged text, where a reasoning block may
come first and tool calls are ``<tool_call>`` blocks of ``{"name", "arguments"}`` JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mach.chat.reasoning import ReasoningTags
from mach.chat.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from mach.decode.grammar import Grammar, GrammarError, GrammarTokenizer, json_rule

if TYPE_CHECKING:
    from mach.adapter import MoeArchAdapter

ANY_TEXT = "/(?s:.*)/"


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})

    def call_schema(self) -> dict[str, Any]:
        """The ``{"name": ..., "arguments": ...}`` object a tagged call of this tool is."""
        return {"type": "object", "properties": {"name": {"const": self.name},
                                                 "arguments": dict(self.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip


@dataclass(frozen=True)
class ReplyFormat:
    """How a checkpoint writes a reply: harmony channels, or tagged text."""

    harmony: bool = False
    reasoning: ReasoningTags | None = None
    reasoning_started: bool = False
    """The prompt itself opened the reasoning block, so the reply begins inside it."""
    tool_call_open: str = TOOL_CALL_OPEN


def _tagged_prefix(fmt: ReplyFormat, grammars: GrammarTokenizer) -> list[str]:
    """Rules for the reasoning a tagged reply may open with, as ``lead_opt``.

    A reasoning block is allowed only where its close tag is one special token: free text
    cannot run past a special token, so the block ends exactly there. A tokenizer without
    the tags has no reasoning block to allow, unless the prompt opened one.
    """
    tags = fmt.reasoning
    close = grammars.literal(tags.close) if tags is not None else ""
    if tags is None or not close.startswith("<["):
        if fmt.reasoning_started:
            raise GrammarError(f"the prompt opens a reasoning block, but {close!r} is not one "
                               "special token of this tokenizer, so its end cannot be "
                               "found; structured output needs reasoning off here")  # fmt: skip
        return ['lead_opt: ""']
    if fmt.reasoning_started:
        return [f"lead_opt: THOUGHT {close} GAP"]
    return [f"lead_opt: ({grammars.literal(tags.open)} THOUGHT {close} GAP)?"]


def _tagged_calls(tools: Sequence[ToolSpec], parallel: bool, grammars: GrammarTokenizer,
                  fmt: ReplyFormat) -> list[str]:  # fmt: skip
    if fmt.tool_call_open != TOOL_CALL_OPEN:
        raise GrammarError(f"calls in this checkpoint's {fmt.tool_call_open!r} format cannot be "
                           "constrained; use tool_choice 'auto'")  # fmt: skip
    schema = {"anyOf": [t.call_schema() for t in tools]} if len(tools) > 1 else \
        tools[0].call_schema()  # fmt: skip
    opened, closed = grammars.literal(TOOL_CALL_OPEN), grammars.literal(TOOL_CALL_CLOSE)
    many = ' ("\\n" call)*' if parallel else ""
    return [f"calls: call{many}", f'call: {opened} "\\n" {json_rule(schema)} "\\n" {closed}']


def _harmony_calls(tools: Sequence[ToolSpec], grammars: GrammarTokenizer) -> list[str]:
    """One commentary message addressed to a function; its ``<|call|>`` ends the reply."""
    lit = grammars.literal
    header = f'{lit("<|channel|>")} "commentary to=functions."'
    calls = [f'{header} "{t.name}" " " {lit("<|constrain|>")} "json" {lit("<|message|>")} '
             f"{json_rule(t.parameters)}" for t in tools]  # fmt: skip
    return [f"calls: {' | '.join(calls)}"]


def reply_grammar(
    tokenizer: GrammarTokenizer,
    fmt: ReplyFormat,
    schema: Mapping[str, Any] | None = None,
    json_answer: bool = False,
    tools: Sequence[ToolSpec] = (),
    must_call: bool = False,
    parallel: bool = True,
    name: str = "response_format",
) -> Grammar | None:
    """The grammar a reply must follow, or ``None`` when nothing constrains it.

    ``json_answer``: the answer is one JSON value valid for ``schema`` (an object without
    one). ``must_call``: the reply is one or more (``parallel``) calls of ``tools``; with
    ``tools`` and a JSON answer but no ``must_call``, the reply is either.
    """
    if must_call and not tools:
        raise GrammarError("tool_choice asks for a call, but no tools are offered")
    if not (json_answer or must_call):
        return None
    # A gap of a few newlines may follow a reasoning block, as templates write it.
    rules: list[str] = [f"THOUGHT: {ANY_TEXT}", "GAP: /[ \\n]{0,4}/"]
    answer: list[str] = []
    if fmt.harmony:
        lit = tokenizer.literal
        analysis = (f'{lit("<|channel|>")} "analysis" {lit("<|message|>")} THOUGHT '
                    f'{lit("<|end|>")} {lit("<|start|>")} "assistant"')  # fmt: skip
        rules.append(f"lead_opt: ({analysis})?")
        if json_answer:
            final = f'{lit("<|channel|>")} "final" {lit("<|message|>")} {json_rule(schema)}'
            answer.append(final)
        if tools:
            rules += _harmony_calls(tools, tokenizer)
    else:
        rules += _tagged_prefix(fmt, tokenizer)
        if json_answer:
            answer.append(json_rule(schema))
        if tools:
            rules += _tagged_calls(tools, parallel, tokenizer, fmt)
    choices = ["calls"] if must_call else [*answer, *(["calls"] if tools else [])]
    rules.insert(0, f"start: lead_opt ({' | '.join(choices)})")
    return Grammar("\n".join(rules), name)


def tool_specs(tools: Sequence[Mapping[str, Any]]) -> list[ToolSpec]:
    """OpenAI ``tools`` entries as specs; a malformed entry raises naming its index."""
    specs = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise GrammarError(f"tools[{i}] needs function.name")
        params = function.get("parameters") or {"type": "object"}  # type: ignore[union-attr]
        if not isinstance(params, Mapping):
            raise GrammarError(f"tools[{i}].function.parameters must be a JSON schema object")
        specs.append(ToolSpec(name, params))
    return specs


def reply_format(adapter: MoeArchAdapter, chat_template: str | None,
                 prompt_text: str) -> ReplyFormat:  # fmt: skip
    """How ``adapter``'s checkpoint writes the reply to the rendered ``prompt_text``."""
    if "<|channel|>" in (chat_template or ""):
        return ReplyFormat(harmony=True)
    tags = adapter.reasoning_tags
    started = tags is not None and prompt_text.rstrip().endswith(tags.open)
    return ReplyFormat(reasoning=tags, reasoning_started=started,
                       tool_call_open=adapter.tool_call_open)  # fmt: skip
