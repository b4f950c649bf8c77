"""Copies of the qwen3_moe fixtures that a test may damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def checkpoint(tmp_path: Path, fixtures_dir: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(fixtures_dir / "qwen3_moe" / "hf-per-expert", target)
    return target


@pytest.fixture
def sharded(tmp_path: Path, fixtures_dir: Path) -> Path:
    target = tmp_path / "sharded"
    shutil.copytree(fixtures_dir / "qwen3_moe" / "hf-sharded", target)
    return target
