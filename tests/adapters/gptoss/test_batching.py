"""Continuous batching on gpt_oss: sliding-window rows (window 8) with attention sinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapters import batch_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "gpt_oss"


@pytest.mark.parametrize("layout", ["hf-float", "mxfp4"])
def test_batched_logits_match_each_sequence_alone(layout: str) -> None:
    checks.batched_logits_match_single(FAMILY / layout)


@pytest.mark.parametrize("layout", ["hf-float", "mxfp4"])
def test_scheduler_gives_the_sequential_tokens(layout: str) -> None:
    checks.scheduler_matches_sequential(FAMILY / layout)
