"""Sampler: greedy, filters, penalties and seeds."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mach.decode.params import SamplingParams
from mach.decode.sampler import Sampler

LOGITS = mx.array([[0.0, 2.0, 1.0, 1.9, -1.0]])


def draws(params: SamplingParams, n: int = 200, history: mx.array | None = None) -> list[int]:
    sampler = Sampler(params)
    return [int(sampler(LOGITS, history).item()) for _ in range(n)]


def test_greedy_takes_the_argmax() -> None:
    assert draws(SamplingParams(temperature=0.0), n=3) == [1, 1, 1]


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    assert set(draws(SamplingParams(temperature=2.0, top_k=1, seed=1))) == {1}


def test_top_k_keeps_only_the_k_best() -> None:
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=3))) == {1, 3}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # probabilities at T=1: token 1 ~0.39, token 3 ~0.35, token 2 ~0.14 ...
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=4))) == {1, 3}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=4))) == {1}


def test_min_p_drops_unlikely_tokens() -> None:
    seen = set(draws(SamplingParams(temperature=1.0, min_p=0.3, seed=5)))
    assert seen == {1, 2, 3}


def test_unfiltered_sampling_reaches_every_token() -> None:
    assert set(draws(SamplingParams(temperature=3.0, seed=6), n=400)) == {0, 1, 2, 3, 4}


def test_seed_makes_draws_reproducible() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    assert draws(params, 50) == draws(params, 50)
    assert draws(params, 50) != draws(SamplingParams(temperature=1.0, seed=99), 50)


def test_repetition_penalty_discourages_seen_tokens() -> None:
    history = mx.array([[1, 1]])
    assert draws(SamplingParams(repetition_penalty=1.2), 1, history) == [3]
    negative = mx.array([[-1.0, -0.5, -3.0]])
    sampler = Sampler(SamplingParams(repetition_penalty=4.0))
    assert int(sampler(negative, mx.array([[1]])).item()) == 0


def test_frequency_penalty_counts_each_appearance() -> None:
    # Token 1 leads token 3 by 0.1; each draw of it costs 0.06 under frequency_penalty alone.
    assert draws(SamplingParams(frequency_penalty=0.06), 4) == [1, 1, 3, 1]


def test_presence_penalty_applies_once_per_token() -> None:
    # Once both leaders have appeared, the penalty no longer grows: they alternate by logit.
    assert draws(SamplingParams(presence_penalty=0.5), 4) == [1, 3, 1, 1]


def test_output_penalties_track_each_row() -> None:
    logits = mx.array(np.array([[0.0, 5.0, 4.5], [4.5, 0.0, 5.0]], dtype=np.float32))
    sampler = Sampler(SamplingParams(frequency_penalty=1.0))
    assert [sampler(logits).tolist() for _ in range(2)] == [[1, 2], [2, 0]]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.0),
     ("repetition_penalty", 0.0), ("max_tokens", -1), ("stop", [""]),
     ("presence_penalty", 2.5), ("frequency_penalty", -2.1)],
)  # fmt: skip
def test_invalid_params_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "stop" else "stop strings"):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_batched_logits_sample_per_row() -> None:
    logits = mx.array(np.array([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]], dtype=np.float32))
    assert Sampler(SamplingParams())(logits).tolist() == [1, 0]
