"""TurboQuant's CUDA attention kernels against attention over the dequantized codes.

They run only where MLX has a CUDA GPU; elsewhere the portable path is the one in use, and
``test_kv_quant.py`` covers it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mach.cache.turboquant import TurboQuantKVCache
from mach.cache.turboquant_kernels import encode, fused_available
from mach.layers.attention import attend

pytestmark = pytest.mark.skipif(not fused_available(), reason="needs MLX's CUDA backend")


def normal(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def over_codes(cache: TurboQuantKVCache, q: mx.array, scale: float, causal: bool,
               sinks: mx.array | None) -> np.ndarray:  # fmt: skip
    """Attention over the dequantized codes in float64 NumPy, GQA heads and all."""
    keys, values = (np.array(a).astype(np.float64) for a in cache.dequantized())
    queries = np.array(q.astype(mx.float32)).astype(np.float64)
    group = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat(group, axis=1), values.repeat(group, axis=1)
    scores = queries @ keys.swapaxes(-1, -2) * scale
    length, held = scores.shape[-2:]
    if causal:
        later = np.arange(held)[None] > np.arange(length)[:, None] + held - length
        scores = np.where(later, -np.inf, scores)
    top = scores.max(-1, keepdims=True)
    if sinks is not None:
        sink = np.array(sinks.astype(mx.float32)).astype(np.float64)[None, :, None, None]
        top = np.maximum(top, sink)
    weights = np.exp(scores - top)
    total = weights.sum(-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(sink - top)
    return np.asarray((weights / total) @ values)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("held", [37, 300, 1029])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_kernels_equal_attention_over_the_codes(bits: int, length: int, held: int,
                                                dim: int) -> None:  # fmt: skip
    cache = TurboQuantKVCache(bits)
    cache.update(normal((1, 2, held, dim), 1), normal((1, 2, held, dim), 2))
    q = normal((1, 8, length, dim), 3)
    out = attend(q, normal((1, 2, length, dim), 4), normal((1, 2, length, dim), 5), cache, 0.1)
    expected = over_codes(cache, q, 0.1, length > 1, None)
    np.testing.assert_allclose(np.array(out), expected, atol=2e-5)


@pytest.mark.parametrize("sink_dtype", [mx.float32, mx.bfloat16])
def test_kernels_take_attention_sinks_and_batches(sink_dtype: mx.Dtype) -> None:
    cache = TurboQuantKVCache(3)
    cache.update(normal((2, 2, 200, 128), 1), normal((2, 2, 200, 128), 2))
    q, sinks = normal((2, 4, 3, 128), 3), mx.array([0.5, -1.0, 2.0, 0.0], sink_dtype)
    out = attend(q, normal((2, 2, 3, 128), 4), normal((2, 2, 3, 128), 5), cache, 0.1, sinks)
    np.testing.assert_allclose(np.array(out), over_codes(cache, q, 0.1, True, sinks), atol=2e-5)


def test_the_portable_path_agrees_with_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MACH_TURBOQUANT_KERNEL=0`` (and blocks past the kernels' limit, like a prefill chunk)
    expand the codes instead; both read the same codes."""
    cache = TurboQuantKVCache(4)
    cache.update(normal((1, 2, 500, 128), 1), normal((1, 2, 500, 128), 2))
    q = normal((1, 4, 1, 128), 3)
    fused = cache.attend(q, normal((1, 2, 1, 128), 4), normal((1, 2, 1, 128), 5), 0.1, None)
    cache.trim(1)
    monkeypatch.setenv("MACH_TURBOQUANT_KERNEL", "0")
    portable = cache.attend(q, normal((1, 2, 1, 128), 4), normal((1, 2, 1, 128), 5), 0.1, None)
    # CUDA's float32 attention may round through TF32; a wrong kernel is off by far more.
    np.testing.assert_allclose(np.array(fused), np.array(portable), atol=2e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_encode_kernel_writes_the_portable_codes(bits: int, dim: int, dtype: mx.Dtype) -> None:
    codecs = TurboQuantKVCache(bits).codecs(dim)
    keys = normal((2, 2, 50, dim), 1).astype(dtype)
    values = normal((2, 2, 50, dim), 2).astype(dtype)
    written = encode(keys, values, codecs)
    for codec, x, rows in zip(codecs, (keys, values), written, strict=True):
        want = codec.encode(x)
        # A coordinate within float rounding of a threshold may round either way.
        codes, want_codes = codec.unpack(rows[..., :-1]), codec.unpack(want[..., :-1])
        assert (codes == want_codes).astype(mx.float32).mean().item() >= 0.999
        norms, want_norms = (np.array(mx.view(r[..., -1], mx.float32)) for r in (rows, want))
        np.testing.assert_allclose(norms, want_norms, rtol=1e-3)


def test_a_prefill_block_attends_over_the_kernels_codes() -> None:
    """Blocks longer than the kernels take expand the codes the encode kernel wrote."""
    cache = TurboQuantKVCache(3)
    q = normal((1, 4, 100, 128), 3)
    out = attend(q, normal((1, 2, 100, 128), 1), normal((1, 2, 100, 128), 2), cache, 0.1)
    np.testing.assert_allclose(np.array(out), over_codes(cache, q, 0.1, True, None), atol=2e-3)


def test_a_bfloat16_model_gets_bfloat16_outputs() -> None:
    cache = TurboQuantKVCache(4)
    keys = normal((1, 2, 300, 128), 1).astype(mx.bfloat16)
    cache.update(keys, normal((1, 2, 300, 128), 2).astype(mx.bfloat16))
    q = normal((1, 4, 1, 128), 3).astype(mx.bfloat16)
    out = attend(q, keys[:, :, :1], keys[:, :, 1:2], cache, 0.1)
    assert out.dtype == mx.bfloat16
    expected = over_codes(cache, q, 0.1, False, None)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=2e-2)
