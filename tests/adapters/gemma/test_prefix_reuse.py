"""Prefix reuse on the gemma4 fixtures: a cached prefix gives the same output as none."""

from __future__ import annotations

from pathlib import Path

from tests.adapters import family_checks as checks

FAMILY = Path(__file__).parents[2] / "fixtures" / "gemma4"


def test_prefix_reuse_equals_full_prefill(tmp_path: Path) -> None:
    checks.prefix_reuse_matches(FAMILY / "hf", tmp_path / "prompt-cache")
