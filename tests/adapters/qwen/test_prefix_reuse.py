"""Prefix reuse on Qwen3-MoE (full attention) and Qwen3.5-MoE (Gated DeltaNet hybrid)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapters import family_checks as checks

FIXTURES = Path(__file__).parents[2] / "fixtures"


@pytest.mark.parametrize("layout", ["qwen3_moe/hf-per-expert", "qwen3_5_moe/hf-per-expert"])
def test_prefix_reuse_equals_full_prefill(tmp_path: Path, layout: str) -> None:
    checks.prefix_reuse_matches(FIXTURES / layout, tmp_path / "prompt-cache")
