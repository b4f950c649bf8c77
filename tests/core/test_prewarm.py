"""Prewarm runs a prompt chunk and a decode step at load, and leaves no trace in what follows."""

from __future__ import annotations

from typing import Any

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import default_model_path
from mach.io.load import LoadedModel
from mach.io.options import LoadOptions

PROMPT = [5, 9, 200, 17, 3, 44]


def loaded(**options: Any) -> LoadedModel:
    return load_moe(default_model_path(), dtype="float32", **options)


def greedy(model: LoadedModel) -> list[int]:
    engine = TargetEngine(model.model, None, model.cache.new)
    return engine.generate(PROMPT, SamplingParams(max_tokens=12)).tokens


def test_prewarmed_load_generates_the_same_tokens() -> None:
    cold, warm = loaded(), loaded(prewarm=True)
    assert greedy(warm) == greedy(cold)
    assert cold.prewarm_seconds is None
    assert warm.prewarm_seconds is not None and warm.prewarm_seconds > 0


def test_prewarm_runs_a_prompt_chunk_and_a_decode_step_through_the_bank() -> None:
    warm = loaded(streaming=True, prewarm=True).store.stats()
    assert warm["prefill"]["calls"] > 0 and warm["decode"]["calls"] > 0
    cold = loaded(streaming=True).store.stats()
    assert cold["prefill"]["calls"] == cold["decode"]["calls"] == 0


def test_a_command_default_yields_to_an_explicit_choice() -> None:
    assert LoadOptions().with_defaults(prewarm=True).prewarm is True
    assert LoadOptions(prewarm=False).with_defaults(prewarm=True).prewarm is False
