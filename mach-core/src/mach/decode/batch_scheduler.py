"""``ContinuousBatchScheduler``: many sequences per decode step, admitted at every step."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.cache.batch import BatchCache, batch_support
from mach.cache.prefix import PrefixCache
from mach.decode.batch_sequence import BatchSequence, Phase
from mach.decode.compiled import CompiledPasses
from mach.decode.engine import DecodeEngine
from mach.decode.events import GenerationResult, TokenEvent
from mach.decode.params import SamplingParams
from mach.decode.prefill import ChunkedPrefill
from mach.experts.store import ExpertStore
from mach.tokenizer.tokenizer import Tokenizer


@dataclass
class _Step:
    """A queued decode step: its rows and what it sampled for each (token, then logprobs)."""

    rows: list[BatchSequence]
    sampled: list[tuple[mx.array, ...]]
    bytes_read: int
    """Expert bytes the step read (streaming stores)."""


class ContinuousBatchScheduler(DecodeEngine):
    """Decodes up to ``max_batch`` sequences together, one token each per ``step``.

    Each step drops cancelled sequences, admits waiting ones while the batch has room, runs
    prefill chunks of the admitted prompts, oldest first, up to ``prefill_step_size`` tokens in
    all, then one decode step for every row of the batch. A long prompt therefore holds running
    streams back by one chunk per step, never by its whole prefill. A prompt prefills alone in
    its own cache (from its longest cached prefix when there is a ``prefix_cache``) and joins
    the batch with its last prompt token, which the next decode step feeds. Sampling settings,
    stop strings and tokens, token limits and logprobs are per sequence; events and statistics
    are those of ``TargetEngine``. With a grammar-constrained row, a step's sampling waits for
    the previous step's tokens (the row's mask needs them), though its forward pass does not.
    With a streaming ``store``, each decode step's expert reads are recorded against its
    batch size.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        make_cache: Callable[[], SequenceCache],
        max_batch: int = 8,
        prefill_step_size: int = 512,
        prefix_cache: PrefixCache | None = None,
        store: ExpertStore | None = None,
        passes: CompiledPasses | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
        template = make_cache()
        reason = batch_support(template.layers)
        if reason is not None:
            raise ValueError(f"this model cannot batch: {reason}")
        self.model = model
        self.tokenizer = tokenizer
        self.make_cache = make_cache
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self.prefix_cache = prefix_cache
        self.store = store
        self.passes = passes
        """Compiled batched decode steps (``None``: built op by op)."""
        self._template = template
        self._waiting: deque[BatchSequence] = deque()
        self._prefilling: deque[BatchSequence] = deque()
        self._rows: list[BatchSequence] = []
        self._batch = BatchCache(template)
        self._pending: _Step | None = None
        self._read_before = 0
        self.steps = 0
        """Decode steps run so far."""

    @property
    def active(self) -> int:
        """Sequences admitted: prefilling or decoding."""
        return len(self._prefilling) + len(self._rows)

    @property
    def batch_size(self) -> int:
        """Rows of the decode batch: sequences past their prefill."""
        return len(self._rows)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._rows or self._pending)

    def add(self, prompt: Sequence[int], params: SamplingParams) -> BatchSequence:
        """Queue a sequence; it is admitted at the next step the batch has room."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        seq = BatchSequence(prompt, params, self.tokenizer)
        if params.max_tokens == 0:
            seq.stats.prompt_seconds = 0.0
            seq.finish()
            return seq
        self._waiting.append(seq)
        return seq

    def step(self) -> list[BatchSequence]:
        """One scheduling round; returns the sequences that produced events.

        The decode step is queued before the previous one's tokens are read back, so the host
        never waits for the device between steps; a sequence that turns out to have finished
        rides along in the queued step, whose token for it is dropped.
        """
        self._drop_cancelled()
        self._admit()
        self._prefill()
        # A sequence whose last token is already queued needs its cache no more.
        spent = [s.generated + s.queued >= s.params.max_tokens for s in self._rows]
        if any(spent):
            self._keep([i for i, gone in enumerate(spent) if not gone])
        previous = self._pending
        touched: list[BatchSequence] = []
        if previous is not None and any(s.matcher is not None for s in self._rows):
            # A grammar's mask needs the previous token on the host: queue the forward pass,
            # read the previous step back while it runs, then sample (finished rows ride along).
            rows = list(self._rows)
            logits = self._forward(rows)
            mx.async_eval(logits)
            touched = self._collect(previous)
            self._pending = self._sample(rows, logits)
        else:
            self._pending = self._sample(self._rows, self._forward(self._rows)) \
                if self._rows else None  # fmt: skip
            if previous is not None:
                touched = self._collect(previous)
        self._drop_done()
        if not touched:
            return []
        if self.prefix_cache is not None and any(s.done for s in touched):
            # The disk tier is written once a request's tokens are out.
            self.prefix_cache.flush()
        return touched

    def reset(self) -> None:
        """Drop every sequence (each ends cancelled) and start from an empty batch."""
        for seq in [*self._waiting, *self._prefilling, *self._rows]:
            seq.cancel()
            seq.phase, seq.cache, seq.prefill = Phase.CANCELLED, None, None
        self._waiting.clear()
        self._prefilling.clear()
        self._rows = []
        self._pending = None
        self._batch = BatchCache(self._template)

    def _drop_cancelled(self) -> None:
        for queue in (self._waiting, self._prefilling):
            for seq in [s for s in queue if s.cancelled]:
                queue.remove(seq)
                seq.phase, seq.cache, seq.prefill = Phase.CANCELLED, None, None
        if any(s.cancelled for s in self._rows):
            for seq in self._rows:
                if seq.cancelled:
                    seq.phase = Phase.CANCELLED
            self._keep([i for i, s in enumerate(self._rows) if not s.cancelled])

    def _admit(self) -> None:
        while self._waiting and self.active < self.max_batch:
            seq = self._waiting.popleft()
            seq.cache = self.make_cache()
            seq.prefill = ChunkedPrefill(self.model, seq.prompt, seq.cache,
                                         self.prefill_step_size, self.prefix_cache)  # fmt: skip
            seq.stats.cached_tokens = seq.prefill.resumed
            seq.phase = Phase.PREFILLING
            self._prefilling.append(seq)

    def _prefill(self) -> None:
        """Prefill chunks, oldest prompt first, up to ``prefill_step_size`` tokens in all (so
        several short prompts go in one step, a long one a chunk at a time); every prompt whose
        prefill is complete joins the batch."""
        budget = self.prefill_step_size
        while self._prefilling:
            seq = self._prefilling[0]
            assert seq.prefill is not None and seq.cache is not None
            while not seq.prefill.done and 0 < seq.prefill.next_size <= budget:
                budget -= seq.prefill.next_size
                seq.prefill.advance()
            if not seq.prefill.done:
                return
            self._prefilling.popleft()
            self._batch.add(seq.cache)
            seq.cache = seq.prefill = None
            seq.phase = Phase.DECODING
            self._rows.append(seq)

    def _forward(self, rows: list[BatchSequence]) -> mx.array:
        """Queue one decode forward pass for ``rows``: ``[rows, vocab]`` logits."""
        self._read_before = self.store.bytes_read if self.store is not None else 0
        inputs = mx.concatenate([s.next_input for s in rows])[:, None]
        if self.passes is not None:
            out: mx.array = self.passes.batch_step(inputs, self._batch)[:, -1, :]
            return out
        logits: mx.array = self.model(inputs, cache=self._batch)[:, -1, :]
        return logits

    def _sample(self, rows: list[BatchSequence], logits: mx.array) -> _Step:
        """Sample every row's next token from ``logits``; the tokens feed the next step."""
        # Routing reads its expert ids back while the step is built, so the reads are done.
        read = self.store.bytes_read - self._read_before if self.store is not None else 0
        sampled: list[tuple[mx.array, ...]]
        if all(s.plain_greedy for s in rows):
            sampled = [(t,) for t in mx.split(mx.argmax(logits, axis=-1), len(rows))]
        else:
            sampled = [s.sample(logits[i : i + 1]) for i, s in enumerate(rows)]
        mx.async_eval(sampled)
        for seq, out in zip(rows, sampled, strict=True):
            seq.next_input = out[0].astype(mx.uint32)
            seq.queued += 1
        self.steps += 1
        return _Step(list(rows), sampled, read)

    def _collect(self, step: _Step) -> list[BatchSequence]:
        """Hand out a step's tokens to the sequences still running."""
        ids: list[int] = mx.concatenate([s[0] for s in step.sampled]).tolist()  # type: ignore[assignment]
        touched = []
        for seq, token, extra in zip(step.rows, ids, step.sampled, strict=True):
            seq.queued -= 1
            if seq.cancelled and not seq.done:
                seq.phase = Phase.CANCELLED
            if not seq.done:
                seq.accept(token, extra[1:])
                touched.append(seq)
        if self.store is not None:
            self.store.record_decode_step(len(step.rows), len(touched), step.bytes_read)
        return touched

    def _drop_done(self) -> None:
        if any(s.done for s in self._rows):
            self._keep([i for i, s in enumerate(self._rows) if not s.done])

    def _keep(self, rows: list[int]) -> None:
        self._batch.keep(rows)
        self._rows = [self._rows[i] for i in rows]

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Run the scheduler until this sequence finishes, yielding its events.

        Other sequences added meanwhile decode alongside and keep their own events.
        """
        seq = self.add(prompt, params)
        try:
            while True:
                yield from seq.drain()
                if seq.done:
                    return
                self.step()
        finally:
            if not seq.done:
                seq.cancel()

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Decode ``prompts`` together (one ``params`` for all, or one each) to the end."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(each) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(each)} sampling settings")
        seqs = [self.add(p, q) for p, q in zip(prompts, each, strict=True)]
        while not all(s.done for s in seqs):
            self.step()
        return [s.result() for s in seqs]
