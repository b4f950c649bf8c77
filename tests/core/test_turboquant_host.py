"""TurboQuant's NumPy attention on a CPU against the MLX path over the same codes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mach.cache.base import SequenceCache
from mach.cache.batch import BatchCache
from mach.cache.turboquant import TurboQuantKVCache
from mach.cache.turboquant_host import HOST_MIN, host_available
from mach.layers.attention import attend

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU's path")


def normal(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def both_paths(monkeypatch: pytest.MonkeyPatch, run: object) -> tuple[np.ndarray, np.ndarray]:
    """``run()`` through NumPy, then with the NumPy path off."""
    fast = np.array(run())  # type: ignore[operator]
    monkeypatch.setenv("MACH_TURBOQUANT_HOST", "0")
    slow = np.array(run())  # type: ignore[operator]
    monkeypatch.delenv("MACH_TURBOQUANT_HOST")
    return fast, slow


def test_short_contexts_stay_on_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_available(HOST_MIN) and not host_available(HOST_MIN - 1)
    monkeypatch.setenv("MACH_TURBOQUANT_HOST", "0")
    assert not host_available(10 * HOST_MIN)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 6])
@pytest.mark.parametrize("held", [HOST_MIN, 1029])
def test_numpy_attention_equals_mlx_attention(monkeypatch: pytest.MonkeyPatch, bits: int,
                                              length: int, held: int) -> None:  # fmt: skip
    cache = TurboQuantKVCache(bits)
    cache.update(normal((1, 2, held, 128), 1), normal((1, 2, held, 128), 2))
    q, sinks = normal((1, 8, length, 128), 3), mx.linspace(-1, 2, 8)
    k, v = normal((1, 2, length, 128), 4), normal((1, 2, length, 128), 5)

    def run() -> mx.array:
        out = attend(q, k, v, cache, 0.1, sinks)
        cache.trim(length)
        return out

    fast, slow = both_paths(monkeypatch, run)
    np.testing.assert_allclose(fast, slow, atol=3e-6)


def test_a_padded_batch_takes_the_numpy_path_too(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = []
    for i, n in enumerate((HOST_MIN + 40, HOST_MIN + 3)):
        cache = TurboQuantKVCache(3)
        cache.update(normal((1, 2, n, 64), 10 + i), normal((1, 2, n, 64), 20 + i))
        rows.append(SequenceCache([cache]))
    q, k, v = normal((2, 4, 1, 64), 3), normal((2, 2, 1, 64), 4), normal((2, 2, 1, 64), 5)

    def run() -> mx.array:
        batch = BatchCache(rows[0])
        for row in rows:
            batch.add(row)
        return attend(q, k, v, batch[0], 0.125)

    fast, slow = both_paths(monkeypatch, run)
    np.testing.assert_allclose(fast, slow, atol=3e-6)
