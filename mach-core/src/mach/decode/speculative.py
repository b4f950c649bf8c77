"""Speculative decoding: a drafter proposes tokens, one target pass verifies them all.

The engine is the same for every draft family. Each cycle the drafter proposes up to ``k``
tokens after the last committed one; the target runs the last committed token and the drafts
in one forward pass; drafts are accepted left to right by the standard rule (greedy: the draft
equals the target's argmax; sampling: accept ``d`` with probability ``min(1, p(d) / q(d))``,
else draw the replacement from ``max(p - q, 0)`` renormalised), and one more token comes from
the target's own distribution at the first rejection or after the last draft. Output is
therefore exactly target-only greedy output, or draws from the target's own distribution.
Rejected positions are trimmed from the target's cache (recurrent layers replay recorded
states), and the drafter is told which tokens were committed together with the target's hidden
states at those positions.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.cache.prefix import PrefixCache
from mach.decode.compiled import CompiledPasses
from mach.decode.engine import DecodeEngine, TargetEngine, TextOutput
from mach.decode.events import GenerationStats, TokenEvent
from mach.decode.params import SamplingParams
from mach.decode.payoff import Payoff
from mach.decode.prefill import prefill_chunks
from mach.decode.sampler import Sampler
from mach.env import env_flag
from mach.tokenizer.tokenizer import Tokenizer

PAYOFF_ENV = "LME_DRAFT_PAYOFF"
MAX_DRAFT_TOKENS = 16
"""The most drafts one verify pass checks; caches guarantee ``trim`` over at least this many."""


@dataclass
class Draft:
    """Proposed tokens, the log-distribution each was drawn from, and its probability."""

    tokens: list[int]
    logprobs: mx.array | None
    """``[n, vocab]`` (``None`` for greedy drafts, which need no distribution)."""
    confidence: list[float]
    """The drafter's probability of each token (a drafter may give 1.0 when no gate is set)."""
    ids: mx.array | None = None
    """A greedy draft still on the device: the verify pass is queued behind the draft pass
    without waiting for it, and ``accept_draft`` reads both back at once and fills
    ``tokens`` in (empty until then)."""

    @property
    def size(self) -> int:
        return self.ids.size if self.ids is not None else len(self.tokens)

    def verify_tokens(self, last: int) -> mx.array:
        """The target's verify pass input: the last committed token, then the drafts."""
        if self.ids is None:
            return mx.array([last, *self.tokens], dtype=mx.uint32)
        head = mx.array([last], dtype=mx.uint32)
        return mx.concatenate([head, self.ids.reshape(-1).astype(mx.uint32)])


@dataclass(frozen=True)
class DraftGate:
    """Confidence gate on draft length (the "rho gate").

    A draft token is kept only while the drafter's own probability of it is at least ``rho``;
    drafting stops at the first token below. The first ``min_tokens`` drafts are always kept.
    ``rho = 0`` keeps every draft up to the requested length.
    """

    rho: float = 0.0
    min_tokens: int = 1

    def keeps(self, index: int, confidence: float) -> bool:
        return index < self.min_tokens or confidence >= self.rho

    @classmethod
    def from_env(cls, default: DraftGate | None = None, prefix: str = "LME_RHO_GATE") -> DraftGate:
        """``LME_RHO_GATE`` (rho) and ``LME_RHO_GATE_MIN`` (min_tokens) over ``default``."""
        default = default or cls()
        raw, floor = os.environ.get(prefix), os.environ.get(f"{prefix}_MIN")
        try:
            rho = float(raw) if raw not in (None, "") else default.rho
            minimum = int(floor) if floor not in (None, "") else default.min_tokens
        except ValueError as exc:
            raise ValueError(f"{prefix}={raw!r}, {prefix}_MIN={floor!r}: {exc}") from exc
        if not 0 <= rho <= 1 or minimum < 0:
            raise ValueError(
                f"{prefix} must be in [0, 1] and {prefix}_MIN >= 0 (got {rho}, {minimum})"
            )
        return cls(rho, minimum)


class Drafter(ABC):
    """A draft family's per-sequence proposer, driven by ``SpecDecEngine``.

    Position ``i`` pairs the target's hidden state at ``i`` with the token at ``i + 1``;
    ``observe`` hands over such pairs as the target commits them and ``propose`` drafts the
    tokens after the last committed one. A drafter keeps its own cache and drops whatever it
    computed from its own guesses before the next proposal.
    """

    needs_hidden: bool = True
    hidden_layers: tuple[int, ...] | None = None
    """Target layers whose residual streams the drafter reads (concatenated); ``None``: the
    target's own ``return_hidden`` output."""
    default_gate: DraftGate = DraftGate()
    """The family's measured default for the rho gate (the environment overrides it)."""
    default_draft_tokens: int = 2
    """Drafts per verify pass when the caller does not choose."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the previous sequence."""

    @abstractmethod
    def observe(self, next_tokens: mx.array, hidden: mx.array | None) -> None:
        """Committed pairs: ``next_tokens [L]`` and the target's ``hidden [1, L, ...]``."""

    @abstractmethod
    def propose(self, k: int, sampler: Sampler, gate: DraftGate) -> Draft:
        """Up to ``k`` tokens after the last committed one (fewer when the gate closes)."""


class DraftPayoff(Payoff):
    """Whether drafting pays here: decode tokens per second of drafted passes against plain
    one-token passes, both measured as the engine runs, so a draft that costs more than it
    saves on this machine stops slowing decoding down. The output never depends on it: a
    plain pass is a verify pass with no drafts. The engine consults it for greedy requests
    only (a sample's random draws follow the passes)."""

    def __init__(
        self, window: int = 16, probe: int = 16, hold: int = 64, longest: int = 1024
    ) -> None:
        super().__init__("draft", "plain", window, probe, hold, longest)

    @property
    def drafting(self) -> bool:
        return self.trying


def accept_draft(target_logits: mx.array, draft: Draft, sampler: Sampler) -> tuple[int, int]:
    """``(accepted, next_token)`` for one verify pass.

    ``target_logits`` is ``[n + 1, vocab]``: row ``i`` is the target's prediction after the last
    committed token and the first ``i`` drafts.
    """
    n = draft.size
    if sampler.params.temperature == 0:
        choice = mx.argmax(target_logits, axis=-1)
        if draft.ids is not None:  # one read for the drafts and the target's choices
            both = mx.concatenate([choice, draft.ids.reshape(-1).astype(choice.dtype)])
            read: list[int] = both.tolist()  # type: ignore[assignment]
            best, draft.tokens = read[: n + 1], read[n + 1 :]
        else:
            best = choice.tolist()  # type: ignore[assignment]
        for i, token in enumerate(draft.tokens):
            if token != best[i]:
                return i, best[i]
        return n, best[n]
    target = sampler.logprobs(target_logits)
    target = target - mx.logsumexp(target, axis=-1, keepdims=True)
    if n:
        assert draft.logprobs is not None
        drafted = draft.logprobs - mx.logsumexp(draft.logprobs, axis=-1, keepdims=True)
        idx = mx.array(draft.tokens)[:, None]
        p = mx.take_along_axis(target[:n], idx, axis=-1)[:, 0]
        q = mx.take_along_axis(drafted, idx, axis=-1)[:, 0]
        u = mx.random.uniform(shape=(n,), key=sampler.next_key())
        accept: list[bool] = (mx.log(u) < p - q).tolist()  # type: ignore[assignment]
        for i in range(n):
            if not accept[i]:
                residual = mx.maximum(mx.exp(target[i]) - mx.exp(drafted[i]), 0)
                total = residual.sum()
                if _scalar(total) <= 0:
                    return i, int(_scalar(mx.random.categorical(target[i], key=sampler.next_key())))
                logits = mx.log(residual / total)
                return i, int(_scalar(mx.random.categorical(logits, key=sampler.next_key())))
    return n, int(_scalar(mx.random.categorical(target[n], key=sampler.next_key())))


def _scalar(value: mx.array) -> float:
    out: list[float] = value.reshape(1).tolist()  # type: ignore[assignment]
    return float(out[0])


def _recording(cache: SequenceCache, on: bool) -> None:
    """Recurrent layers record per-token states while a verify pass may be trimmed."""
    for layer in cache:
        if hasattr(layer, "start_recording"):
            getattr(layer, "start_recording" if on else "stop_recording")()


class SpecDecEngine(DecodeEngine):
    """Speculative decoding with any ``Drafter``; lossless against ``TargetEngine``.

    The target model must accept ``return_hidden=True`` when the drafter needs hidden states.
    Requests this engine does not speculate on (repetition, presence or frequency penalties,
    logprobs, a grammar) run target-only.
    A ``prefix_cache`` restores the target's cache as in ``TargetEngine``; the drafter starts
    from the restored position and sees only the rest of the prompt, which can lower its
    acceptance on that request but never changes the output.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        make_cache: Callable[[], SequenceCache],
        drafter: Drafter,
        num_draft_tokens: int | None = None,
        gate: DraftGate | None = None,
        prefill_step_size: int = 512,
        prefix_cache: PrefixCache | None = None,
        passes: CompiledPasses | None = None,
    ) -> None:
        if num_draft_tokens is None:
            num_draft_tokens = drafter.default_draft_tokens
        if not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(
                f"num_draft_tokens must be between 1 and {MAX_DRAFT_TOKENS}, got {num_draft_tokens}"
            )
        self.model, self.tokenizer, self.make_cache = model, tokenizer, make_cache
        self.drafter, self.k = drafter, num_draft_tokens
        self.gate = gate or DraftGate()
        self.prefill_step_size = prefill_step_size
        self.prefix_cache = prefix_cache
        self.passes = passes
        self._fallback = TargetEngine(model, tokenizer, make_cache, prefill_step_size, prefix_cache,
                                      passes)  # fmt: skip
        self.payoff = DraftPayoff()
        self.measure = env_flag(PAYOFF_ENV, True)
        """Whether greedy requests may stop drafting where it measures slower
        (``LME_DRAFT_PAYOFF=0`` always drafts)."""

    def _forward(
        self, tokens: mx.array, cache: SequenceCache, decoding: bool = False
    ) -> tuple[mx.array, mx.array | None]:
        """The target's pass over ``tokens``: compiled when ``decoding`` (not a prompt chunk)
        and the engine has compiled passes."""
        if self.drafter.hidden_layers is not None:
            if decoding and self.passes is not None:
                logits, hidden = self.passes(tokens, cache, self.drafter.hidden_layers)
            else:
                logits, hidden = self.model(tokens[None], cache=cache,
                                            hidden_layers=self.drafter.hidden_layers)  # fmt: skip
            return logits[0], hidden
        if decoding and self.passes is not None and not self.drafter.needs_hidden:
            return self.passes(tokens, cache)[0], None
        if self.drafter.needs_hidden:
            logits, hidden = self.model(tokens[None], cache=cache, return_hidden=True)
            return logits[0], hidden
        return self.model(tokens[None], cache=cache)[0], None

    def _plain_passes(
        self, last: int, cache: SequenceCache, sampler: Sampler, stats: GenerationStats,
        limit: int,
    ) -> Iterator[int]:  # fmt: skip
        """Greedy one-token passes from ``last`` while ``DraftPayoff`` keeps plain mode, at most
        ``limit`` tokens, each pass queued before the previous token is read.

        A pass that is queued is always handed out (the consumer may stop early and drop
        it, with the request), so the cache never holds a position the output did not take.
        """
        logits, hidden = self._forward(mx.array([last], mx.uint32), cache, decoding=True)
        token = sampler(logits[-1:])
        mx.async_eval(token)
        began = time.perf_counter()
        for handed in range(limit):
            current, current_hidden = token, hidden
            more = not self.payoff.drafting and handed + 1 < limit
            if more:
                logits, hidden = self._forward(current, cache, decoding=True)
                token = sampler(logits[-1:])
                mx.async_eval(token)
            value = int(_scalar(current))
            self.drafter.observe(mx.array([value], mx.uint32), current_hidden)
            stats.target_passes += 1
            now = time.perf_counter()
            self.payoff.record(1, now - began)
            began = now
            yield value
            if not more:
                return

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
        penalised = params.repetition_penalty != 1.0 or params.output_penalties
        # These read each token before the next is drafted; target-only serves them.
        if penalised or params.logprobs is not None or params.grammar is not None:
            yield from self._fallback.stream(prompt, params)
            return
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        stats = GenerationStats(prompt_tokens=len(prompt))
        output = TextOutput(self.tokenizer, params)
        sampler = Sampler(params)
        cache = self.make_cache()
        self.drafter.reset()
        mx.reset_peak_memory()
        start = time.perf_counter()
        if params.max_tokens == 0:
            stats.prompt_seconds = time.perf_counter() - start
            yield TokenEvent(None, "", "length", stats)
            return

        tokens = mx.array(list(prompt), dtype=mx.uint32)
        pc = self.prefix_cache
        stats.cached_tokens = pc.resume(prompt, cache) if pc is not None else 0
        cut = pc.snapshot_at(len(prompt), stats.cached_tokens, cache) if pc is not None else None
        logits = hidden = None
        begin = 0
        chunks = prefill_chunks(stats.cached_tokens, tokens.size, self.prefill_step_size, cut)
        for begin, end in chunks:
            logits, hidden = self._forward(tokens[begin:end], cache)
            if end < tokens.size:
                self.drafter.observe(tokens[begin + 1 : end + 1], hidden)
            mx.eval(logits)
            if pc is not None and end == cut:
                pc.store(prompt[:cut], cache.export_state(), defer=True)
        assert logits is not None
        last = int(_scalar(sampler(logits[-1:])))
        self.drafter.observe(mx.concatenate([tokens[begin + 1 :], mx.array([last], mx.uint32)]),
                             hidden)  # fmt: skip
        decode_start = time.perf_counter()
        stats.prompt_seconds = stats.time_to_first_token = decode_start - start

        compiled_before = self.passes.compiled if self.passes is not None else 0
        generated = 0
        # What the last pass committed: a drafted pass's list, or a stretch of plain passes.
        pending: Iterable[int] = [last]
        newest = last
        stats.target_passes = 1  # the pass that ended the prompt gave ``last``
        while True:
            stopped = False
            for token in pending:
                generated += 1
                newest = token
                event = output.event(token)
                stopped = event is None
                if event is not None:
                    yield event
                    stopped = output.stopped or generated >= params.max_tokens
                if stopped:
                    break
            if stopped:
                break
            began = time.perf_counter()
            # Greedy output does not depend on how passes are cut, so only there may timing
            # decide; a seeded sample stays reproducible by always drafting.
            drafting = self.payoff.drafting or params.temperature != 0 or not self.measure
            if not drafting:
                # Plain passes run like target-only decoding: the next one is queued before
                # this one's token is read, so the host never waits for the device.
                pending = self._plain_passes(newest, cache, sampler, stats,
                                             params.max_tokens - generated)  # fmt: skip
                continue
            k = min(self.k, params.max_tokens - generated - 1)
            draft = self.drafter.propose(k, sampler, self.gate) if k > 0 else Draft([], None, [])
            verify = draft.verify_tokens(newest)
            _recording(cache, True)
            logits, hidden = self._forward(verify, cache, decoding=True)
            accepted, bonus = accept_draft(logits, draft, sampler)
            rejected = len(draft.tokens) - accepted
            if rejected and cache.trim(rejected) != rejected:
                raise RuntimeError(
                    f"the target cache could not drop {rejected} rejected positions; use fewer "
                    "draft tokens per pass"
                )
            _recording(cache, False)
            committed = [*draft.tokens[:accepted], bonus]
            self.drafter.observe(mx.array(committed, dtype=mx.uint32),
                                 None if hidden is None else hidden[:, : accepted + 1])  # fmt: skip
            if params.temperature == 0:
                self.payoff.record(len(committed), time.perf_counter() - began)
            if k > 0:  # plain passes are target steps, not verify passes of a draft
                stats.draft_tokens += len(draft.tokens)
                stats.accepted_tokens += accepted
                stats.verify_passes += 1
            stats.target_passes += 1
            pending = committed
        if self.passes is not None:
            stats.compiled_passes = self.passes.compiled - compiled_before
        final = output.final(stats, generated, decode_start)
        if self.prefix_cache is not None:
            # The disk tier is written once the tokens are out, off the time to first token.
            self.prefix_cache.flush()
        yield final
