"""Continuous batching on the Qwen fixtures: standard KV (qwen3_moe), GDN hybrid (qwen3_5_moe)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapters import batch_checks as checks

FIXTURES = Path(__file__).parents[2] / "fixtures"
LAYOUTS = ["qwen3_moe/hf-per-expert", "qwen3_moe/mlx-q4", "qwen3_5_moe/hf-per-expert"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_logits_match_each_sequence_alone(layout: str) -> None:
    checks.batched_logits_match_single(FIXTURES / layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scheduler_gives_the_sequential_tokens(layout: str) -> None:
    checks.scheduler_matches_sequential(FIXTURES / layout)
