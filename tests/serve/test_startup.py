"""A server start loads once: one detection, one header read per file, one model build."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import mach.io.checkpoint
import mach.io.plan
from mach import REGISTRY
from mach.io.options import LoadOptions
from mach_serve.server import build_state

FIXTURE = Path(__file__).parents[1] / "fixtures" / "deepseek_v4" / "upstream"


def test_serve_start_reads_and_builds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    adapter = REGISTRY["deepseek_v4"]

    def counted(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(mach.io.checkpoint, "read_header",
                        counted("read_header", mach.io.checkpoint.read_header))  # fmt: skip
    monkeypatch.setattr(mach.io.plan, "detect_arch",
                        counted("detect_arch", mach.io.plan.detect_arch))  # fmt: skip
    monkeypatch.setattr(adapter, "build_model", counted("build_model", adapter.build_model))
    state = build_state(str(FIXTURE), options=LoadOptions(streaming=False))
    files = len(list(FIXTURE.glob("*.safetensors")))
    assert calls == {"read_header": files, "detect_arch": 1, "build_model": 1}
    assert type(state.worker.engine).__name__ == "SpecDecEngine"
    assert state.checkpoint["store"]["residency"] == "resident"
    assert state.context_length > 0
