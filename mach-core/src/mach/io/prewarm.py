"""Prewarm: a short forward at load, so the first request does not pay for it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import SequenceCache
from mach.decode.compiled import CompiledPasses
from mach.experts.bank import DECODE_TOKENS

PREWARM_TOKENS = 2 * DECODE_TOKENS
"""Long enough to run as a prompt chunk, not as a decode step."""


def prewarm(
    model: nn.Module, new_cache: Callable[[], Sequence[Any]], passes: CompiledPasses | None = None
) -> float:
    """Run a prompt chunk and one decode step through fresh caches, then drop them.

    The kernels of both paths get built (GPU backends compile them on first use) and every
    weight the forward reads is touched, so pages of a memory-mapped checkpoint are in memory.
    With ``passes``, the decode step is traced as the compiled graph requests will replay.
    A streaming bank takes the experts the decode step routes to. Returns the seconds spent.
    """
    start = time.perf_counter()
    cache = SequenceCache(new_cache())
    tokens = mx.arange(PREWARM_TOKENS, dtype=mx.uint32)
    mx.eval(model(tokens[None], cache=cache))
    last = tokens[-1:]
    mx.eval(passes(last, cache) if passes is not None else model(last[None], cache=cache))
    return time.perf_counter() - start
