"""The generic speculative engine: lossless for any drafter, rollback, the rho gate."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.cache.base import SequenceCache
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.sampler import Sampler
from mach.decode.speculative import Draft, Drafter, DraftGate, SpecDecEngine, accept_draft

FIXTURE = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "hf-fused"


class ShadowDrafter(Drafter):
    """Drafts with the target model itself (its own cache), wrong on every ``wrong``-th token.

    Exact drafts exercise full acceptance; deliberate misses exercise rejection and rollback.
    """

    needs_hidden = False

    def __init__(self, model: object, cache: SequenceCache, wrong: int = 0) -> None:
        self.model, self.template, self.wrong = model, cache, wrong

    def reset(self) -> None:
        self.cache = self.template.new()
        for layer in self.cache:  # recurrent layers must record to step back over guesses
            if hasattr(layer, "start_recording"):
                layer.start_recording()
        self.pending: list[int] = []
        self.guessed = 0
        self.count = 0

    def observe(self, next_tokens: mx.array, hidden: mx.array | None) -> None:
        tokens: list[int] = next_tokens.tolist()  # type: ignore[assignment]
        if not self.pending and self.cache.offset == 0:
            self.pending = [self.first]
        self.pending += tokens

    def start(self, first: int) -> None:
        self.first = first

    def propose(self, k: int, sampler: Sampler, gate: DraftGate) -> Draft:
        if self.guessed:
            self.cache.trim(self.guessed)
        logits = self.model(mx.array([self.pending]), cache=self.cache)[0, -1]  # type: ignore[operator]
        self.pending, drafted = [], []
        for i in range(k):
            token = int(mx.argmax(logits).item())
            self.count += 1
            if self.wrong and self.count % self.wrong == 0:
                token = (token + 1) % logits.shape[-1]
            drafted.append(token)
            if i + 1 < k:
                logits = self.model(mx.array([[token]]), cache=self.cache)[0, -1]  # type: ignore[operator]
        self.guessed = k - 1
        return Draft(drafted, None, [1.0] * len(drafted))


@pytest.fixture(scope="module")
def loaded() -> tuple[object, object, SequenceCache]:
    model, tokenizer, _, cache = load_moe(FIXTURE)
    return model, tokenizer, cache


def _engine(loaded: tuple[object, object, SequenceCache], prompt: list[int], wrong: int,
            k: int) -> SpecDecEngine:  # fmt: skip
    model, _, cache = loaded
    drafter = ShadowDrafter(model, cache, wrong)
    drafter.start(prompt[0])
    return SpecDecEngine(model, None, cache.new, drafter, num_draft_tokens=k)  # type: ignore[arg-type]


@pytest.mark.parametrize(("wrong", "k"), [(0, 3), (3, 3), (2, 4), (5, 1)])
def test_greedy_output_is_target_only_output(loaded: tuple[object, object, SequenceCache],
                                             wrong: int, k: int) -> None:  # fmt: skip
    model, _, cache = loaded
    prompt = [5, 17, 99, 4, 250, 31, 7]
    params = SamplingParams(max_tokens=30, temperature=0.0)
    expected = TargetEngine(model, None, cache.new).generate(prompt, params).tokens  # type: ignore[arg-type]
    result = _engine(loaded, prompt, wrong, k).generate(prompt, params)
    assert result.tokens == expected
    stats = result.stats
    assert stats.verify_passes > 0 and stats.draft_tokens > 0
    # Every target pass counts: the prompt's, each verify cycle and any plain step.
    assert stats.verify_passes < stats.target_passes <= stats.generation_tokens
    assert stats.generation_tokens <= (k + 1) * stats.target_passes
    if wrong == 0:
        assert stats.accepted_tokens == stats.draft_tokens
        assert stats.acceptance_length > k  # k drafts plus the bonus on almost every pass
    else:
        assert 0 < stats.accepted_tokens < stats.draft_tokens


def test_accepted_tokens_are_drawn_from_the_target_distribution() -> None:
    """Rejection sampling: whatever the draft distribution, output follows the target's."""
    p = np.array([0.5, 0.2, 0.2, 0.1], np.float32)
    q = np.array([0.1, 0.6, 0.1, 0.2], np.float32)
    target = mx.log(mx.array(np.stack([p, p])))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    draws = np.random.default_rng(3).choice(4, size=4000, p=q)
    counts = np.zeros(4)
    for d in draws:
        draft = Draft([int(d)], mx.log(mx.array(q))[None], [float(q[d])])
        accepted, bonus = accept_draft(target, draft, sampler)
        counts[int(d) if accepted else bonus] += 1
    freq = counts / counts.sum()
    assert np.abs(freq - p).max() < 0.03, freq


def test_greedy_acceptance_compares_with_argmax() -> None:
    logits = mx.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert accept_draft(logits, Draft([1, 0], None, [1, 1]), sampler) == (2, 2)
    assert accept_draft(logits, Draft([1, 2], None, [1, 1]), sampler) == (1, 0)
    assert accept_draft(logits, Draft([2, 0], None, [1, 1]), sampler) == (0, 1)


def test_gate_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LME_RHO_GATE", "0.4")
    monkeypatch.setenv("LME_RHO_GATE_MIN", "0")
    gate = DraftGate.from_env()
    assert gate == DraftGate(0.4, 0)
    assert not gate.keeps(0, 0.3) and gate.keeps(0, 0.5)
    monkeypatch.setenv("LME_RHO_GATE", "1.5")
    with pytest.raises(ValueError, match="LME_RHO_GATE"):
        DraftGate.from_env()


def test_requests_it_cannot_speculate_on_run_target_only(
    loaded: tuple[object, object, SequenceCache],
) -> None:
    prompt = [5, 17, 99]
    params = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3)
    result = _engine(loaded, prompt, 0, 2).generate(prompt, params)
    assert result.stats.verify_passes == 0 and len(result.tokens) == 8
    assert result.stats.target_passes == 8  # one token per pass, the prompt's pass first


@pytest.mark.parametrize("wrong", [0, 3])
def test_recurrent_layers_roll_back_through_recorded_states(wrong: int) -> None:
    """Qwen3.5's Gated DeltaNet layers cannot cut a state back; the engine replays recordings."""
    path = Path(__file__).parents[1] / "fixtures" / "qwen3_5_moe" / "hf-per-expert"
    model, _, _, cache = load_moe(path)
    prompt = [5, 17, 99, 4, 250, 31, 7]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    expected = TargetEngine(model, None, cache.new).generate(prompt, params).tokens
    drafter = ShadowDrafter(model, cache, wrong)
    drafter.start(prompt[0])
    result = SpecDecEngine(model, None, cache.new, drafter, 3).generate(prompt, params)
    assert result.tokens == expected
    assert result.stats.accepted_tokens > 0


def test_draft_length_is_bounded(loaded: tuple[object, object, SequenceCache]) -> None:
    with pytest.raises(ValueError, match="between 1 and 16"):
        _engine(loaded, [5, 6], 0, 17)


def test_drafting_stops_where_it_measures_slower_and_is_tried_again() -> None:
    from mach.decode.speculative import DraftPayoff

    payoff = DraftPayoff(window=2, probe=2, hold=3)
    for _ in range(2):  # drafted passes: 2 tokens in 10 ms
        assert payoff.drafting
        payoff.record(2, 0.010)
    for _ in range(2):  # plain passes: 1 token in 4 ms, faster
        assert not payoff.drafting
        payoff.record(1, 0.004)
    for _ in range(3):  # plain wins and holds
        assert not payoff.drafting
        payoff.record(1, 0.004)
    assert payoff.drafting  # then drafting is measured again
    for _ in range(2):
        payoff.record(4, 0.010)  # now 400 tok/s: drafting wins
    assert payoff.drafting and payoff.left == 3


def test_a_mode_that_keeps_winning_is_held_longer() -> None:
    from mach.decode.speculative import DraftPayoff

    payoff = DraftPayoff(window=1, probe=1, hold=2, longest=8)
    holds = []
    for _ in range(5):
        assert payoff.drafting
        while payoff.drafting:  # drafting: 3 tokens in 10 ms, always faster
            payoff.record(3, 0.010)
        payoff.record(1, 0.010)  # the plain probe
        holds.append(payoff.left)
    assert holds == [2, 4, 8, 8, 8]
    while payoff.drafting:
        payoff.record(1, 0.100)  # drafting became slow: plain wins and the hold starts over
    payoff.record(1, 0.010)
    assert not payoff.drafting and payoff.left == 2
