"""``BatchSequence``: one request inside the continuous-batching scheduler."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from enum import Enum

import mlx.core as mx

from mach.cache.base import SequenceCache
from mach.decode.engine import TextOutput
from mach.decode.events import GenerationResult, GenerationStats, TokenEvent
from mach.decode.grammar import sequence_matcher
from mach.decode.logprobs import best_first, token_logprobs
from mach.decode.params import SamplingParams
from mach.decode.prefill import ChunkedPrefill
from mach.decode.sampler import Sampler
from mach.tokenizer.tokenizer import Tokenizer


class Phase(str, Enum):
    WAITING = "waiting"
    """Queued until the batch has room."""
    PREFILLING = "prefilling"
    """Its prompt runs through its own cache, one chunk per scheduler step."""
    DECODING = "decoding"
    """A row of the batch: one token per step."""
    FINISHED = "finished"
    CANCELLED = "cancelled"


class BatchSequence:
    """A prompt, its sampling settings and what it has produced so far.

    Events queue in ``events`` as the scheduler produces them; ``drain`` takes them.
    ``cancel`` may be called from any thread: the sequence leaves at the next step.
    """

    def __init__(
        self, prompt: Sequence[int], params: SamplingParams, tokenizer: Tokenizer | None
    ) -> None:
        self.prompt = list(prompt)
        self.params = params
        self.phase = Phase.WAITING
        self.events: deque[TokenEvent] = deque()
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.output = TextOutput(tokenizer, params)
        self.sampler = Sampler(params)
        self.matcher = sequence_matcher(params.grammar, tokenizer)
        self.generated = 0
        self.queued = 0
        """Tokens sampled in decode steps not yet read back (at most one)."""
        self.start = time.perf_counter()
        self.decode_start = self.start
        self.cache: SequenceCache | None = None
        self.prefill: ChunkedPrefill | None = None
        self.next_input = mx.array(self.prompt[-1:], dtype=mx.uint32)
        """``[1]``: what the next decode step feeds (the last prompt token, then each sampled
        one, still on the device)."""
        penalised = params.repetition_penalty != 1.0 and params.repetition_context > 0
        context = self.prompt[-params.repetition_context :]
        self.history = mx.array([context], dtype=mx.uint32) if penalised else None
        self._cancel = threading.Event()

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.CANCELLED)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Leave the batch at the next step; no further events are produced."""
        self._cancel.set()

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to report or penalise: an argmax over the batch serves it."""
        p = self.params
        return (p.temperature == 0 and self.history is None and p.logprobs is None
                and not p.output_penalties and self.matcher is None)  # fmt: skip

    def sample(self, logits: mx.array) -> tuple[mx.array, ...]:
        """The next token ``[1]`` from this row's logits ``[1, vocab]`` (and its logprobs)."""
        allowed = self.matcher.restrict(logits) if self.matcher is not None else logits
        token = self.sampler(allowed, self.history)
        if self.history is not None:
            context = self.params.repetition_context
            self.history = mx.concatenate([self.history, token[None].astype(mx.uint32)], axis=1)
            self.history = self.history[:, -context:]
        if self.params.logprobs is None:
            return (token,)
        return (token, *token_logprobs(logits, token, self.params.logprobs))

    def accept(self, token: int, logprobs: Sequence[mx.array] = ()) -> None:
        """Take one sampled token: queue its event, and the final one when it ends the run."""
        if self.generated == 0:
            self.decode_start = time.perf_counter()
            self.stats.prompt_seconds = self.decode_start - self.start
            self.stats.time_to_first_token = self.stats.prompt_seconds
        self.generated += 1
        event = self.output.event(token)
        if event is not None:
            if logprobs:
                event.logprob = float(logprobs[0].item())  # type: ignore[arg-type]
                if len(logprobs) > 1:
                    ids: list[int] = logprobs[1][0].tolist()  # type: ignore[assignment]
                    values: list[float] = logprobs[2][0].tolist()  # type: ignore[assignment]
                    event.top_logprobs = best_first(ids, values)
            self.events.append(event)
        if event is None or self.output.stopped or self.generated >= self.params.max_tokens:
            self.finish()
        elif self.matcher is not None:
            self.matcher.accept(token)

    def finish(self) -> None:
        """Queue the closing event (held-back text, finish reason, statistics)."""
        self.events.append(self.output.final(self.stats, self.generated, self.decode_start))
        self.phase = Phase.FINISHED
        self.cache = self.prefill = None

    def drain(self) -> list[TokenEvent]:
        """The events produced since the last call, oldest first."""
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    def result(self) -> GenerationResult:
        """The whole run, once finished and while its events are undrained."""
        events = list(self.events)
        if not events or events[-1].finish_reason is None:
            raise RuntimeError("the sequence has not finished, or its events were drained")
        final = events[-1]
        assert final.finish_reason is not None and final.stats is not None
        tokens = [e.token for e in events if e.token is not None]
        return GenerationResult("".join(e.text for e in events), tokens, final.finish_reason,
                                final.stats)  # fmt: skip
