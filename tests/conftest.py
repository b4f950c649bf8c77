"""Shared test setup: strict plugin loading and fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A plugin that fails to import must fail the tests, never be skipped quietly.
os.environ["MACH_STRICT_PLUGINS"] = "1"
os.environ.pop("MACH_LOAD_PLUGINS", None)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
