"""Chunked prefill of one sequence's prompt, from its longest cached prefix."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.cache.prefix import PrefixCache


def prefill_chunks(start: int, stop: int, step: int, cut: int | None) -> Iterator[tuple[int, int]]:
    """``(begin, end)`` chunks of at most ``step`` tokens over ``[start, stop)``, one ending at
    ``cut`` so the prefix cache can snapshot there."""
    begin = start
    while begin < stop:
        end = min(begin + step, stop)
        if cut is not None and begin < cut < end:
            end = cut
        yield begin, end
        begin = end


class ChunkedPrefill:
    """Runs all but the last prompt token into ``cache``, one chunk per ``advance``.

    With a ``prefix_cache`` the sequence starts from its longest cached prefix and the cache
    is snapshotted where the prefix cache asks (``PrefixCache.snapshot_at``). The last prompt
    token is left for the first decode step, so a snapshot never has to cover the whole
    prompt.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt: Sequence[int],
        cache: SequenceCache,
        step: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if step <= 0:
            raise ValueError(f"the prefill step must be positive, got {step}")
        self.model, self.prompt, self.cache = model, prompt, cache
        self.prefix_cache = prefix_cache
        self.resumed = prefix_cache.resume(prompt, cache) if prefix_cache is not None else 0
        """Prompt tokens restored from the prefix cache."""
        self._cut = (prefix_cache.snapshot_at(len(prompt), self.resumed, cache)
                     if prefix_cache is not None else None)  # fmt: skip
        self._tokens = mx.array(list(prompt), dtype=mx.uint32)
        self._chunks = prefill_chunks(self.resumed, len(prompt) - 1, step, self._cut)
        self._next = next(self._chunks, None)

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def next_size(self) -> int:
        """Tokens the next ``advance`` runs (0 when done)."""
        return 0 if self._next is None else self._next[1] - self._next[0]

    def advance(self) -> None:
        """Run the next chunk (at most ``step`` tokens) and evaluate the cache."""
        if self._next is None:
            return
        begin, end = self._next
        self.model(self._tokens[None, begin:end], cache=self.cache)
        mx.eval([getattr(c, "state", None) for c in self.cache])
        pc = self.prefix_cache
        if pc is not None and end == self._cut:
            pc.store(self.prompt[: self._cut], self.cache.export_state(), defer=True)
        self._next = next(self._chunks, None)

    def run(self) -> int:
        """Every remaining chunk; returns how many tokens came from the prefix cache."""
        while not self.done:
            self.advance()
        return self.resumed
