"""Continuous batching on gemma4: sliding-window and full-attention rows, proportional RoPE."""

from __future__ import annotations

from pathlib import Path

from tests.adapters import batch_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "gemma4"


def test_batched_logits_match_each_sequence_alone() -> None:
    checks.batched_logits_match_single(FAMILY / "hf")


def test_scheduler_gives_the_sequential_tokens() -> None:
    checks.scheduler_matches_sequential(FAMILY / "hf")
