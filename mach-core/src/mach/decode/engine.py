"""Decode engines: prompt tokens + sampling params -> a stream of token events."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.cache.prefix import PrefixCache
from mach.decode.compiled import CompiledPasses
from mach.decode.events import FinishReason, GenerationResult, GenerationStats, TokenEvent
from mach.decode.grammar import sequence_matcher
from mach.decode.logprobs import best_first, token_logprobs
from mach.decode.params import SamplingParams
from mach.decode.payoff import Payoff
from mach.decode.prefill import ChunkedPrefill
from mach.decode.sampler import Sampler
from mach.decode.stopping import StopMatcher
from mach.experts.device_routing import RETRIES, DeferredStep, DeviceRouting
from mach.tokenizer.detokenizer import StreamingDetokenizer
from mach.tokenizer.tokenizer import Tokenizer


class DecodeEngine(ABC):
    """The interface every engine (target-only, speculative, batched) shares."""

    @abstractmethod
    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Generate from ``prompt``; the last event has ``finish_reason`` and ``stats``."""

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> GenerationResult:
        """Run ``stream`` to the end and collect the text and token ids."""
        text, tokens = [], []
        for event in self.stream(prompt, params):
            text.append(event.text)
            if event.token is not None:
                tokens.append(event.token)
            if event.finish_reason is not None:
                assert event.stats is not None
                return GenerationResult("".join(text), tokens, event.finish_reason, event.stats)
        raise RuntimeError("decode stream ended without a finish event")


class TextOutput:
    """One request's generated ids -> token events: end ids, detokenizing, stop strings."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams) -> None:
        self.stops = set(params.stop_token_ids)
        if tokenizer is not None:
            self.stops |= tokenizer.eos_token_ids
        self.detok: StreamingDetokenizer | None = (
            tokenizer.detokenizer() if tokenizer is not None else None
        )
        self.matcher = StopMatcher(params.stop)
        self.finish: FinishReason = "length"

    def event(self, token: int) -> TokenEvent | None:
        """The token's event, or ``None`` for an end id (which ends generation unprinted)."""
        if token in self.stops:
            self.finish = "stop"
            return None
        text = self.detok.add_token(token) if self.detok is not None else ""
        return TokenEvent(token, self.matcher.feed(text))

    @property
    def stopped(self) -> bool:
        """A stop string has appeared; nothing after it is emitted."""
        if self.matcher.stopped:
            self.finish = "stop"
        return self.matcher.stopped

    def final(self, stats: GenerationStats, generated: int, decode_start: float) -> TokenEvent:
        """The closing event: held-back text, the finish reason and the run's statistics."""
        tail = self.detok.finalize() if self.detok is not None else ""
        tail = self.matcher.feed(tail) + self.matcher.flush()
        stats.generation_tokens = generated
        # One token per pass unless the engine counted its own (speculative decoding).
        stats.target_passes = stats.target_passes or generated
        stats.generation_seconds = time.perf_counter() - decode_start
        stats.peak_memory_bytes = mx.get_peak_memory()
        return TokenEvent(None, tail, self.finish, stats)


@dataclass
class _Queued:
    """A queued decode step: the token it consumes, the state to go back to, what it gives."""

    last: mx.array
    offset: int = 0
    key: mx.array | None = None
    history: mx.array | None = None
    out: tuple[mx.array, ...] = ()
    check: DeferredStep | None = None
    """The device-routed calls to confirm before its token counts (``None``: host path)."""
    read: bool = False
    """Its token was read."""
    tries: int = 0
    """Device runs of this step before this one (each dropped after a miss)."""


class TargetEngine(DecodeEngine):
    """Target-model-only decoding: chunked prefill, then one token per step.

    The next step is queued before the current token is handed out, so the host never waits
    for the device between tokens. With a ``prefix_cache``, a request starts from its longest
    cached prefix and prefills only the rest; the last prompt token always goes through a
    decode step, so a snapshot never has to cover the whole prompt. With a grammar
    (``params.grammar``) a step's mask needs the token before it on the host: the forward
    pass is still queued ahead, and the mask is computed while the device runs it.

    With streamed experts, a step after one that found every expert in the bank looks its
    experts up on the device (``mach.experts.device_routing``) and is checked when its token
    is read; a step that routed to a missing expert is dropped, with the one queued after it,
    and run again after fetching what it missed (or, after a few tries, on the host path).
    ``routing_payoff`` keeps whichever of the two paths measures faster.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        make_cache: Callable[[], SequenceCache],
        prefill_step_size: int = 512,
        prefix_cache: PrefixCache | None = None,
        passes: CompiledPasses | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.make_cache = make_cache
        self.prefill_step_size = prefill_step_size
        self.prefix_cache = prefix_cache
        self.passes = passes
        """Compiled decode steps (``None``: every step is built op by op)."""
        self.routing = DeviceRouting.of(model)
        """Device routing of streamed experts (``None``: nothing streams, or it is off)."""
        self.routing_payoff = Payoff("device", "host")
        """Whether device routing decodes faster than the host path here, measured across
        requests: with routing that seldom finds a whole step held, dropped steps cost more
        than the waits they save."""

    def _prefill(self, prompt: Sequence[int], cache: SequenceCache) -> int:
        """Run all but the last prompt token; returns how many came from the prefix cache."""
        return ChunkedPrefill(self.model, prompt, cache, self.prefill_step_size,
                              self.prefix_cache).run()  # fmt: skip

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        stats = GenerationStats(prompt_tokens=len(prompt))
        output = TextOutput(self.tokenizer, params)
        sampler = Sampler(params)
        matcher = sequence_matcher(params.grammar, self.tokenizer)
        cache = self.make_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        tokens = mx.array(list(prompt), dtype=mx.uint32)
        penalised = params.repetition_penalty != 1.0 and params.repetition_context > 0
        history = tokens[-params.repetition_context :][None] if penalised else None

        want_logprobs = params.logprobs is not None
        top_n = params.logprobs or 0

        def forward(last: mx.array) -> mx.array:
            if self.passes is not None:
                out: mx.array = self.passes(last, cache)[:, -1, :]
                return out
            logits: mx.array = self.model(last[None], cache=cache)[:, -1, :]
            return logits

        def pick(logits: mx.array) -> tuple[mx.array, ...]:
            nonlocal history
            allowed = matcher.restrict(logits) if matcher is not None else logits
            token = sampler(allowed, history)
            if history is not None:
                history = mx.concatenate([history, token[None]], axis=1)
                history = history[:, -params.repetition_context :]
            if not want_logprobs:
                return (token,)
            return (token, *token_logprobs(logits, token, top_n))

        if params.max_tokens == 0:
            stats.prompt_seconds = time.perf_counter() - start
            yield TokenEvent(None, "", "length", stats)
            return
        stats.cached_tokens = self._prefill(prompt, cache)
        compiled_before = self.passes.compiled if self.passes is not None else 0
        # A step routed on the device may have to be dropped: the caches must trim.
        routing = self.routing if matcher is None and cache.is_trimmable() else None
        # The first step finds out on the host path what the bank holds; after a dropped
        # step, the host path runs for a hold that doubles with each drop in a row.
        device_next, hold, penalty = False, 0, 1
        payoff, last_read = self.routing_payoff, 0.0

        def queue(last: mx.array, tries: int = 0) -> _Queued:
            """Build and queue the step that consumes ``last``; with ``device_next`` its
            experts are looked up on the device and checked when its token is read."""
            nonlocal device_next, hold
            step = _Queued(last, cache.offset, sampler.key, history, tries=tries)
            if routing is not None and device_next and hold == 0 and payoff.trying:
                routing.begin()
                try:
                    step.out = pick(forward(last))
                finally:
                    step.check = routing.end()
                mx.async_eval(*step.out, step.check.held)
                return step
            hold = max(0, hold - 1)
            before = routing.misses() if routing is not None else 0
            step.out = pick(forward(last))
            mx.async_eval(step.out)
            if routing is not None:  # a host-path step without misses: the device may do
                device_next = routing.misses() == before
            return step

        def redo(step: _Queued) -> _Queued:
            """``step`` routed to an expert the bank did not hold: drop it and what was queued
            after it, read what it missed and run it on the device again, or after
            ``RETRIES`` tries on the host path, which reads the misses layer by layer."""
            nonlocal history, hold, penalty
            assert step.key is not None and step.check is not None
            cache.trim(cache.offset - step.offset)
            sampler.key, history = step.key, step.history
            stats.rerouted_steps += 1
            if step.tries < RETRIES:
                step.check.fetch()
                return queue(step.last, step.tries + 1)
            hold, penalty = penalty, min(64, 2 * penalty)
            return queue(step.last)

        pending = queue(tokens[-1:])
        # With a grammar, the forward pass of the next token is queued as soon as the token is
        # (on the device); only its sampling waits for the mask, which needs it on the host.
        logits = forward(pending.out[0]) if matcher is not None and params.max_tokens > 1 else None
        if logits is not None:
            mx.async_eval(logits)
        generated = 0
        decode_start = start
        while generated < params.max_tokens:
            step = pending
            if matcher is None and generated + 1 < params.max_tokens:
                pending = queue(step.out[0])
            token = int(step.out[0].item())  # type: ignore[arg-type]
            while step.check is not None and not step.check.held.item():
                step = redo(step)
                if matcher is None and generated + 1 < params.max_tokens:
                    pending = queue(step.out[0])
                token = int(step.out[0].item())  # type: ignore[arg-type]
            if routing is not None:
                now = time.perf_counter()
                if generated:
                    payoff.record(1, now - last_read)
                last_read = now
            if step.check is not None:
                step.check.settle()
                penalty = 1
                stats.device_routed_steps += 1
                # A step that took tries: the next one after it starts on the host path, and
                # goes to the device again after a host step that misses nothing.
                device_next = device_next and step.tries == 0
            current, step.read = step.out, True
            if logits is not None and matcher is not None and token not in output.stops:
                matcher.accept(token)
                pending = _Queued(step.out[0], out=pick(logits))
                mx.async_eval(pending.out)
                logits = forward(pending.out[0]) if generated + 2 < params.max_tokens else None
                if logits is not None:
                    mx.async_eval(logits)
            if generated == 0:
                decode_start = time.perf_counter()
                stats.prompt_seconds = stats.time_to_first_token = decode_start - start
            generated += 1
            event = output.event(token)
            if event is None:
                break
            if want_logprobs:
                event.logprob = float(current[1].item())  # type: ignore[arg-type]
                if top_n:
                    ids: list[int] = current[2][0].tolist()  # type: ignore[assignment]
                    values: list[float] = current[3][0].tolist()  # type: ignore[assignment]
                    event.top_logprobs = best_first(ids, values)
            yield event
            if output.stopped:
                break
        if pending.check is not None and not pending.read and pending.check.held.item():
            # A step queued past a stop still ran: its experts count as used, as on the host path.
            pending.check.settle()
        if self.passes is not None:
            stats.compiled_passes = self.passes.compiled - compiled_before
        final = output.final(stats, generated, decode_start)
        if self.prefix_cache is not None:
            # The disk tier is written once the tokens are out, off the time to first token.
            self.prefix_cache.flush()
        yield final
