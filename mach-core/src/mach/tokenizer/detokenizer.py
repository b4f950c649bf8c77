"""Streaming detokenizer: text deltas that never split a UTF-8 character."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StreamingDetokenizer:
    """Turn token ids into text deltas as they arrive.

    Each new id is decoded together with the ids of the previous delta; the new text is what
    that decode adds beyond the previous delta, so decoders that treat a sequence's first
    token specially (leading spaces) give the same text as one full decode. A delta that ends
    in U+FFFD is held back until the bytes of the character are complete, so no emitted piece
    ever contains a broken character.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def add_token(self, token: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.tokens.append(token)
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        delta = full[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self.tokens)
        self.text += delta
        return delta

    def finalize(self) -> str:
        """Flush whatever is held back (a stream that ends mid-character keeps U+FFFD)."""
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        delta = full[len(prefix_text) :] if len(full) > len(prefix_text) else ""
        self._prefix = self._read = len(self.tokens)
        self.text += delta
        return delta
