"""Constrained decoding: a ``Grammar`` limits which tokens may come next, step by step.

Grammars are llguidance's Lark dialect (JSON schemas inline as ``%json {...}``); llguidance
computes each step's allowed-token mask from the tokenizer's vocabulary. It is the optional
``mach-core[grammar]`` extra; asking for a grammar without it is a clear error.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from mach.errors import MachError
from mach.tokenizer.tokenizer import Tokenizer

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "key_separator": ": ",
    "item_separator": ", ",
}
"""One space after ``:`` and ``,``, none elsewhere: a model cannot pad its output forever."""
WORD_BITS = 32


class GrammarError(MachError):
    """A grammar or schema llguidance cannot compile, or a token the grammar refused."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise GrammarError(
            "structured output needs llguidance: pip install 'mach-core[grammar]'"
        ) from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What generated text must match, as llguidance Lark; ``name`` says what it came from."""

    lark: str
    name: str = "grammar"

    @classmethod
    def json(cls, schema: Mapping[str, Any] | None = None, name: str = "json") -> Grammar:
        """Exactly one JSON value valid for ``schema``; any JSON object without one."""
        return cls(f"start: {json_rule(schema)}", name)

    @classmethod
    def regex(cls, pattern: str, name: str = "regex") -> Grammar:
        return cls(f"start: /{pattern}/", name)


def json_rule(schema: Mapping[str, Any] | None) -> str:
    """A Lark expression for one JSON value valid for ``schema`` (an object when ``None``)."""
    body: dict[str, Any] = dict(schema) if schema is not None else {"type": "object"}
    body["x-guidance"] = {**JSON_OPTIONS, **body.get("x-guidance", {})}
    return f"%json {json.dumps(body)}"


class GrammarTokenizer:
    """A checkpoint tokenizer as llguidance sees it; built once per tokenizer (it reads every
    token's bytes) and shared by all matchers."""

    _built: ClassVar[weakref.WeakKeyDictionary[Tokenizer, GrammarTokenizer]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, tokenizer: Tokenizer) -> None:
        llg = _llguidance()
        if not tokenizer.eos_token_ids:
            raise GrammarError("structured output needs the tokenizer's end-of-sequence token; "
                               "this checkpoint names none (eos_token_id in "
                               "config.json)")  # fmt: skip
        self.tokenizer = tokenizer
        self.llg = llg.LLTokenizer(tokenizer.backend.to_str(),
                                   eos_token=sorted(tokenizer.eos_token_ids))  # fmt: skip
        self.vocab_size: int = self.llg.vocab_size
        self.mask_words = (self.vocab_size + WORD_BITS - 1) // WORD_BITS
        self._bits: dict[int, tuple[mx.array, mx.array]] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> GrammarTokenizer:
        built = cls._built.get(tokenizer)
        if built is None:
            built = cls._built[tokenizer] = cls(tokenizer)
        return built

    def literal(self, text: str) -> str:
        """``text`` as a Lark item: the special token itself when ``text`` is one, else a
        string (a special token is never produced by spelling out its characters)."""
        token = self.tokenizer.token_id(text)
        if token is not None and self.llg.is_special_token(token):
            return f"<[{token}]>"
        return json.dumps(text)

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        return GrammarMatcher(self, grammar)

    def check(self, grammar: Grammar) -> None:
        """Raise :class:`GrammarError` naming the problem when ``grammar`` does not compile."""
        self.matcher(grammar)

    def bit_index(self, width: int) -> tuple[mx.array, mx.array]:
        """Per logit column: which mask word holds its bit, and the bit's place in the word."""
        if width not in self._bits:
            columns = mx.arange(width, dtype=mx.uint32)
            # Columns past the vocabulary read the matcher's trailing word of zeros.
            word = mx.minimum(columns // WORD_BITS, self.mask_words)
            self._bits[width] = (word, columns % WORD_BITS)
        return self._bits[width]


class GrammarMatcher:
    """One sequence's position in its grammar: the allowed next tokens, and each token taken.

    Tokens past the tokenizer's vocabulary (padded embedding rows) are never allowed. Once the
    grammar is complete, only end-of-sequence tokens are.
    """

    def __init__(self, tokenizer: GrammarTokenizer, grammar: Grammar) -> None:
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.grammar = grammar
        self._matcher = llg.LLMatcher(tokenizer.llg, grammar.lark, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"{grammar.name}: {first_line(self._matcher.get_error())}")
        self._words = np.zeros(tokenizer.mask_words + 1, dtype=np.int32)
        """The mask, one bit per token, and a last word of zeros for padded vocabulary rows."""

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but an end token may follow."""
        return bool(self._matcher.is_stopped())

    def allowed(self, width: int) -> mx.array:
        """``[1, width]`` booleans: which logit columns may be sampled next."""
        from llguidance.numpy import fill_next_token_bitmask

        view = self._words[None, :-1]
        fill_next_token_bitmask(self._matcher, view)
        if self._matcher.is_error():
            raise GrammarError(f"{self.grammar.name}: {first_line(self._matcher.get_error())}")
        word, bit = self.tokenizer.bit_index(width)
        words = mx.array(self._words.view(np.uint32))
        return (((words[word] >> bit) & 1) == 1)[None]

    def restrict(self, logits: mx.array) -> mx.array:
        """``logits [1, vocab]`` with every token the grammar forbids at ``-inf``."""
        return mx.where(self.allowed(logits.shape[-1]), logits, -mx.inf)

    def accept(self, token: int) -> None:
        """Advance past a sampled token (an end token needs no advancing)."""
        if token in self.tokenizer.tokenizer.eos_token_ids:
            return
        if not self._matcher.consume_token(token):
            raise GrammarError(f"{self.grammar.name}: token {token} is outside the grammar "
                               f"({first_line(self._matcher.get_error())})")  # fmt: skip


def first_line(error: str) -> str:
    """llguidance's message without the parser state it appends."""
    return error.strip().split("\n", 1)[0]


def sequence_matcher(grammar: Grammar | None, tokenizer: Tokenizer | None) -> GrammarMatcher | None:
    """A fresh matcher for one sequence asking for ``grammar``, or ``None`` without one."""
    if grammar is None:
        return None
    if tokenizer is None:
        raise GrammarError(f"{grammar.name}: constrained output needs the checkpoint's tokenizer")
    return GrammarTokenizer.of(tokenizer).matcher(grammar)
