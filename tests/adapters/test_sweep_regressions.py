"""Configs the fidelity sweep once found broken, kept as golden fixtures.

Each ``tests/fixtures/sweep/<family>/<name>`` folder was written by ``tools/fidelity_sweep.py
--fixture`` (its ``case.json`` holds the config and the command); the reference is
transformers' float32 logits for a full forward and for a prefill followed by cache steps.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.adapters import family_checks as checks

FIXTURES = Path(__file__).parents[1] / "fixtures"
CASES = sorted(FIXTURES.glob("sweep/*/*"))


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_there_are_sweep_fixtures() -> None:
    assert len(CASES) >= 2


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_full_forward_matches_transformers(case: Path) -> None:
    assert checks.max_logit_error(case) <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_prefill_then_steps_match_transformers_cache(case: Path) -> None:
    model, _, _, cache = checks.load(case)
    ref = checks.reference(case)
    ids, prefill = mx.array(ref["input_ids"][:1]), int(ref["prefill"])
    steps = [model(ids[:, :prefill], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    got = np.array(mx.concatenate(steps, axis=1).astype(mx.float32))
    np.testing.assert_allclose(got, ref["incremental_logits"], atol=1e-4, rtol=0)
