"""Token sampling: greedy, temperature, top-k, top-p, min-p, penalties, seeds."""

from __future__ import annotations

import mlx.core as mx

from mach.decode.params import SamplingParams


class Sampler:
    """Draws the next token from ``[batch, vocab]`` logits with one sequence's settings.

    A seed makes the draw reproducible: the sampler owns its own PRNG key and splits it each
    step, so concurrent sequences never share random state.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int(mx.random.randint(0, 2**31, ()))
        self._key = mx.random.key(seed)
        self._counts: mx.array | None = None
        """``[batch, vocab]``: how often each token was drawn (only with output penalties)."""

    def __call__(self, logits: mx.array, history: mx.array | None = None) -> mx.array:
        """Token ids ``[batch]``; ``history`` is ``[batch, n]`` of recent tokens (or ``None``)."""
        logits = self.penalized(logits, history)
        if self.params.temperature == 0:
            token = mx.argmax(logits, axis=-1)
        else:
            token = mx.random.categorical(self.logprobs(logits), axis=-1, key=self.next_key())
        if self.params.output_penalties:
            self.count(token, logits.shape[-1])
        return token

    def count(self, token: mx.array, vocab: int) -> None:
        """Record drawn tokens ``[batch]`` for the presence and frequency penalties."""
        drawn = (mx.arange(vocab)[None] == token[:, None]).astype(mx.float32)
        self._counts = drawn if self._counts is None else self._counts + drawn

    def penalized(self, logits: mx.array, history: mx.array | None) -> mx.array:
        """Float32 logits with the repetition penalty applied over ``history`` and the output
        penalties over the tokens this sampler has drawn."""
        p = self.params
        logits = logits.astype(mx.float32)
        if p.repetition_penalty != 1.0 and history is not None and history.size:
            seen = mx.take_along_axis(logits, history, axis=-1)
            seen = mx.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            logits = mx.put_along_axis(logits, history, seen, axis=-1)
        if self._counts is not None:
            present = (self._counts > 0).astype(mx.float32)
            logits = logits - p.frequency_penalty * self._counts - p.presence_penalty * present
        return logits

    def logprobs(self, logits: mx.array) -> mx.array:
        """The distribution a draw comes from: temperature, then top-k, min-p and top-p.

        Filtered-out tokens get ``-inf``; the rest are not renormalised (the draw does not need
        it; callers comparing distributions renormalise). Needs ``temperature > 0``.
        """
        p = self.params
        logprobs = logits.astype(mx.float32) / p.temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if 0 < p.top_k < logprobs.shape[-1]:
            kth = mx.sort(logprobs, axis=-1)[..., -p.top_k][..., None]
            logprobs = mx.where(logprobs < kth, -mx.inf, logprobs)
        if p.min_p > 0:
            floor = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(p.min_p))
            logprobs = mx.where(logprobs < floor, -mx.inf, logprobs)
        if p.top_p < 1:
            order = mx.argsort(-logprobs, axis=-1)
            ordered = mx.take_along_axis(logprobs, order, axis=-1)
            before = mx.cumsum(mx.exp(ordered), axis=-1) - mx.exp(ordered)
            ordered = mx.where(before >= p.top_p, -mx.inf, ordered)
            logprobs = mx.put_along_axis(logprobs, order, ordered, axis=-1)
        return logprobs

    @property
    def key(self) -> mx.array:
        """The state of this sampler's stream (set it back to replay the draws after it)."""
        return self._key

    @key.setter
    def key(self, key: mx.array) -> None:
        self._key = key

    def next_key(self) -> mx.array:
        """A fresh PRNG key from this sampler's stream."""
        self._key, key = mx.random.split(self._key)
        return key
