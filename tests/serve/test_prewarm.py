"""`mach serve` prewarms at load unless told not to (`--no-prewarm`)."""

from __future__ import annotations

from mach.io.options import LoadOptions
from mach_serve.server import build_state


def test_serve_prewarms_unless_told_not_to() -> None:
    warm = build_state(None, options=LoadOptions(streaming=True))
    assert warm.store.stats()["decode"]["calls"] > 0
    cold = build_state(None, options=LoadOptions(streaming=True, prewarm=False))
    assert cold.store.stats()["decode"]["calls"] == 0
