"""Quantized KV caches: TurboQuant's rotation, codebooks and distortion; both caches against a
reference attention; trim, snapshots, prefix reuse and the load option."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach import load_moe
from mach.cache.affine_kv import AffineKVCache
from mach.cache.base import SequenceCache
from mach.cache.batch import BatchCache, batch_support
from mach.cache.batch_turboquant import BatchTurboQuantCache
from mach.cache.kv import KVCache
from mach.cache.prefix import PrefixCache
from mach.cache.turboquant import TurboQuantCodec, TurboQuantKVCache, distortion, lloyd_max
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.default_model import default_model_path
from mach.errors import OptionsError
from mach.layers.attention import attend

# Lloyd-Max centroids of N(0, 1), positive half (published with TurboQuant and in the
# quantization literature).
PUBLISHED = {
    2: [0.4528, 1.5104],
    3: [0.2451, 0.7560, 1.3439, 2.1519],
    4: [0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326],
}
PUBLISHED_MSE = {2: 0.1175, 3: 0.0346, 4: 0.0095}


def vectors(shape: tuple[int, ...], seed: int = 0, outliers: bool = True) -> mx.array:
    """Gaussian vectors with a few large channels, as attention keys have."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    if outliers:
        x[..., :3] *= 12.0
    return mx.array(x)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebooks_match_the_published_values(bits: int) -> None:
    centroids = lloyd_max(bits)
    half = centroids[len(centroids) // 2 :]
    np.testing.assert_allclose(half, PUBLISHED[bits], atol=2e-4)
    np.testing.assert_allclose(centroids, -centroids[::-1], atol=1e-6)
    assert distortion(bits) == pytest.approx(PUBLISHED_MSE[bits], rel=0.02)
    assert distortion(bits) <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("dim", [64, 128])
def test_the_rotation_is_orthogonal(dim: int) -> None:
    codec = TurboQuantCodec(dim, 3, seed=1)
    basis = codec.rotate(mx.eye(dim))
    np.testing.assert_allclose(np.array(basis @ basis.T), np.eye(dim), atol=1e-5)
    x = vectors((5, dim))
    np.testing.assert_allclose(np.array(codec.unrotate(codec.rotate(x))), np.array(x), atol=1e-4)
    other = TurboQuantCodec(dim, 3, seed=2)
    assert not np.allclose(np.array(other.rotate(x)), np.array(codec.rotate(x)))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128])
def test_distortion_is_within_the_quantizer_bound(bits: int, dim: int) -> None:
    """Relative squared error per vector near the codebook's MSE, whatever the outliers; the
    corrected norm keeps each vector's length."""
    codec = TurboQuantCodec(dim, bits, seed=0)
    x = vectors((4000, dim))
    y = codec.decode(codec.encode(x))
    length = mx.linalg.norm(x, axis=-1)
    relative = (mx.sum((x - y) ** 2, axis=-1) / length**2).mean().item()
    assert relative <= 1.25 * PUBLISHED_MSE[bits]
    np.testing.assert_allclose(np.array(mx.linalg.norm(y, axis=-1)), np.array(length), rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_codes_pack_and_unpack(bits: int, dim: int) -> None:
    codec = TurboQuantCodec(dim, bits, seed=0)
    idx = mx.array(np.random.default_rng(0).integers(0, 2**bits, (3, 7, dim)).astype(np.uint32))
    packed = codec.pack(idx)
    assert packed.shape == (3, 7, codec.words) and packed.dtype == mx.uint32
    assert (codec.unpack(packed) == idx).all().item()


def test_a_bad_head_dim_or_bit_width_is_refused() -> None:
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        TurboQuantCodec(96, 3, 0)
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        TurboQuantKVCache(5)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        AffineKVCache(3)


def reference(cache: TurboQuantKVCache | AffineKVCache, q: mx.array, scale: float,
              mask: str | None) -> mx.array:  # fmt: skip
    """Plain attention over the cache's keys and values as they were stored."""
    if isinstance(cache, TurboQuantKVCache):
        keys, values = cache.dequantized()
    else:
        parts = [cache._held[n][:, :, : cache.offset] for n in
                 ("k_q", "k_scales", "k_biases", "v_q", "v_scales", "v_biases")]  # fmt: skip
        keys = mx.dequantize(*parts[:3], group_size=64, bits=cache.bits)
        values = mx.dequantize(*parts[3:], group_size=64, bits=cache.bits)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


@pytest.mark.parametrize("make", [lambda: TurboQuantKVCache(3), lambda: AffineKVCache(4),
                                  lambda: AffineKVCache(8)])  # fmt: skip
def test_attention_equals_attention_over_the_stored_codes(make: object) -> None:
    cache = make()  # type: ignore[operator]
    k, v = vectors((1, 2, 40, 64), 1), vectors((1, 2, 40, 64), 2, outliers=False)
    q = vectors((1, 4, 40, 64), 3, outliers=False)
    prefill = attend(q, k, v, cache, 0.125)
    np.testing.assert_allclose(np.array(prefill), np.array(reference(cache, q, 0.125, "causal")),
                               atol=2e-5)  # fmt: skip
    q1 = vectors((1, 4, 1, 64), 4, outliers=False)
    step = attend(q1, vectors((1, 2, 1, 64), 5), vectors((1, 2, 1, 64), 6), cache, 0.125)
    np.testing.assert_allclose(np.array(step), np.array(reference(cache, q1, 0.125, None)),
                               atol=2e-5)  # fmt: skip


def test_affine_decode_takes_attention_sinks() -> None:
    cache = AffineKVCache(8)
    k, v = vectors((1, 2, 30, 64), 1), vectors((1, 2, 30, 64), 2)
    attend(vectors((1, 4, 30, 64), 3), k, v, cache, 0.125)
    q1, sinks = vectors((1, 4, 1, 64), 4), mx.array([0.5, -1.0, 2.0, 0.0])
    out = attend(q1, vectors((1, 2, 1, 64), 5), vectors((1, 2, 1, 64), 6), cache, 0.125, sinks)
    parts = [cache._held[n][:, :, : cache.offset] for n in
             ("k_q", "k_scales", "k_biases", "v_q", "v_scales", "v_biases")]  # fmt: skip
    expected = mx.fast.scaled_dot_product_attention(
        q1, mx.dequantize(*parts[:3], group_size=64, bits=8),
        mx.dequantize(*parts[3:], group_size=64, bits=8), scale=0.125, sinks=sinks)  # fmt: skip
    # Two float32 paths (fused quantized matmuls against dequantize + SDPA) differ by a few
    # 1e-5 depending on kernel choice; sinks handled wrong would be off by 1e-2 or more.
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=1e-4)


def test_turboquant_attention_stays_close_to_full_precision() -> None:
    """Gaussian keys, values and queries: a harder case than a model's peaked attention."""
    keys = vectors((1, 2, 512, 128), 1, outliers=False)
    values = vectors((1, 2, 512, 128), 2, outliers=False)
    q = vectors((1, 4, 1, 128), 3, outliers=False)
    exact = attend(q, keys, values, None, 1 / math.sqrt(128))
    for bits, floor in ((4, 0.985), (3, 0.955), (2, 0.86)):
        cache = TurboQuantKVCache(bits)
        cache.update(keys, values)
        out = cache.attend(q, keys[:, :, :0], values[:, :, :0], 1 / math.sqrt(128), None)
        cosine = (out * exact).sum() / (mx.linalg.norm(out) * mx.linalg.norm(exact))
        assert cosine.item() >= floor, (bits, cosine.item())


@pytest.mark.parametrize("make", [lambda: TurboQuantKVCache(3), lambda: AffineKVCache(4)])
def test_trim_snapshot_restore_and_export_round_trip(make: object) -> None:
    cache = make()  # type: ignore[operator]
    k, v = vectors((1, 2, 300, 64), 1), vectors((1, 2, 300, 64), 2)
    cache.update(k, v)
    mark = cache.snapshot()
    cache.update(k[:, :, :5], v[:, :, :5])
    assert cache.trim(5) == 5 and cache.offset == 300
    cache.update(k[:, :, :3], v[:, :, :3])
    cache.restore(mark)
    assert cache.offset == 300
    with pytest.raises(ValueError, match="forward"):
        cache.restore(301)
    state = cache.export_state()
    fresh = make()  # type: ignore[operator]
    fresh.load_state(state)
    q = vectors((1, 4, 1, 64), 9, outliers=False)
    one, two = vectors((1, 2, 1, 64), 10), vectors((1, 2, 1, 64), 11)
    before = np.array(cache.attend(q, one, two, 0.125, None))
    np.testing.assert_allclose(before, np.array(fresh.attend(q, one, two, 0.125, None)), atol=1e-6)
    fresh.update(one, two)  # later writes never reach the exported state
    assert state.meta["offset"] == 300 and state.arrays[next(iter(state.arrays))].shape[2] == 300


def test_three_bit_keys_and_values_take_under_a_quarter_of_float16() -> None:
    for dim in (64, 128):
        cache = TurboQuantKVCache(3)
        cache.update(vectors((1, 4, 100, dim)), vectors((1, 4, 100, dim)))
        float16 = 2 * 1 * 4 * 100 * dim * 2
        assert cache.stored_bytes <= 0.25 * float16


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    loaded = load_moe(default_model_path())
    assert loaded.tokenizer is not None
    return loaded.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")


def greedy(prompt: list[int], tokens: int, **options: object) -> list[int]:
    loaded = load_moe(default_model_path(), **options)
    engine = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
    return engine.generate(prompt, SamplingParams(max_tokens=tokens)).tokens


def test_four_bit_turboquant_keeps_the_default_models_greedy_output(prompt: list[int]) -> None:
    assert greedy(prompt, 12, kv_bits=4)[:5] == greedy(prompt, 12)[:5]
    assert greedy(prompt, 12, kv_bits=8, kv_format="affine") == greedy(prompt, 12)


def test_the_load_option_swaps_full_attention_caches_only() -> None:
    loaded = load_moe(default_model_path(), kv_bits=3)
    assert all(type(c) is TurboQuantKVCache for c in loaded.cache.new())
    assert all(type(c) is KVCache for c in load_moe(default_model_path()).cache.new())
    assert batch_support(loaded.cache.layers) is None
    batched = build_engine(loaded, draft=False, max_batch=8)
    assert type(batched).__name__ == "ContinuousBatchScheduler"
    affine = load_moe(default_model_path(), kv_bits=8, kv_format="affine")
    reason = batch_support(affine.cache.layers)
    assert reason is not None and "AffineKVCache (affine_kv)" in reason
    assert type(build_engine(affine, draft=False, max_batch=8)).__name__ == "TargetEngine"


@pytest.mark.parametrize(("options", "words"), [
    ({"kv_bits": 5}, "kv_bits for turboquant must be one of 2, 3, 4"),
    ({"kv_bits": 3, "kv_format": "affine"}, "kv_bits for affine must be one of 4, 8"),
    ({"kv_bits": 4, "kv_format": "fp8"}, "kv_format must be one of turboquant, affine"),
])  # fmt: skip
def test_bad_kv_options_are_named(options: dict[str, object], words: str) -> None:
    with pytest.raises(OptionsError, match=words):
        load_moe(default_model_path(), **options)


def test_a_prefix_hit_equals_a_miss_with_quantized_kv(prompt: list[int]) -> None:
    loaded = load_moe(default_model_path(), kv_bits=3)
    prefix = PrefixCache.for_model(loaded, block_size=8)
    engine = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new, prefix_cache=prefix)
    params = SamplingParams(max_tokens=10)
    cold = engine.generate(prompt, params)
    warm = engine.generate(prompt, params)
    assert warm.stats.cached_tokens > 0 and warm.tokens == cold.tokens
    plain = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new).generate(prompt, params)
    assert plain.tokens == cold.tokens


def test_generate_takes_kv_bits() -> None:
    result = subprocess.run([sys.executable, "-m", "mach", "generate", "--kv-bits", "3", "-n", "6",
                             "--prompt", "import os", "--quiet"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    bad = subprocess.run([sys.executable, "-m", "mach", "generate", "--kv-bits", "7", "-n", "2"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "kv_bits for turboquant must be one of 2, 3, 4" in bad.stderr


def test_other_families_quantize_their_full_attention_layers(fixtures_dir: Path) -> None:
    """Sliding windows stay full precision; gpt-oss's sinks reach the quantized attention."""
    for family in ("gpt_oss/hf-float", "gemma4/hf", "qwen3_5_moe/hf-per-expert"):
        loaded = load_moe(fixtures_dir / family, kv_bits=4)
        kinds = {type(c).__name__ for c in loaded.cache.new()}
        assert "TurboQuantKVCache" in kinds and "KVCache" not in kinds, (family, kinds)
        engine = TargetEngine(loaded.model, None, loaded.cache.new)
        assert len(engine.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=6)).tokens) == 6


def test_a_model_without_full_attention_caches_says_so(fixtures_dir: Path) -> None:
    with pytest.raises(OptionsError, match=r"has none \(compressed caches\); leave --kv-bits off"):
        load_moe(fixtures_dir / "deepseek_v4" / "hf-fused", kv_bits=3)


def test_affine_needs_head_dims_of_whole_groups(fixtures_dir: Path) -> None:
    loaded = load_moe(fixtures_dir / "gpt_oss" / "hf-float", kv_bits=8, kv_format="affine")
    engine = TargetEngine(loaded.model, None, loaded.cache.new)
    with pytest.raises(OptionsError, match=r"multiple of 32 .* use --kv-format turboquant"):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128])
def test_the_run_table_expands_codes_exactly(bits: int, dim: int) -> None:
    codec = TurboQuantCodec(dim, bits, seed=0)
    rows = codec.encode(vectors((3, 50, dim)))
    assert rows.shape == (3, 50, codec.row_words)
    norm = mx.view(rows[..., -1], mx.float32)
    one_by_one = codec.centroids[codec.unpack(rows[..., :-1])] * norm[..., None]
    assert mx.array_equal(codec.decode_rotated(rows), one_by_one).item()


@pytest.mark.parametrize("bits", [2, 4])
def test_a_batch_attends_each_row_over_its_own_codes(bits: int) -> None:
    """Rows of ragged lengths, left-padded in the batch, read what they read alone."""
    lengths, dim = (7, 30, 1), 64
    alone = [TurboQuantKVCache(bits) for _ in lengths]
    for i, (cache, n) in enumerate(zip(alone, lengths, strict=True)):
        cache.update(vectors((1, 2, n, dim), 10 + i), vectors((1, 2, n, dim), 20 + i))
    batch = BatchCache(SequenceCache([alone[0]]))
    for cache in alone:
        batch.add(SequenceCache([cache]))
    assert batch.layers[0].padding == [23, 0, 29]
    for step in range(2):
        q = vectors((3, 4, 1, dim), 30 + step, outliers=False)
        k, v = vectors((3, 2, 1, dim), 40 + step), vectors((3, 2, 1, dim), 50 + step)
        together = attend(q, k, v, batch[0], 0.125)
        for row, cache in enumerate(alone):
            by_itself = attend(q[row : row + 1], k[row : row + 1], v[row : row + 1], cache, 0.125)
            np.testing.assert_allclose(np.array(together[row : row + 1]), np.array(by_itself),
                                       atol=2e-6)  # fmt: skip
    batch.keep([2, 0])
    q = vectors((2, 4, 1, dim), 60, outliers=False)
    k, v = vectors((2, 2, 1, dim), 61), vectors((2, 2, 1, dim), 62)
    together = attend(q, k, v, batch[0], 0.125)
    for row, cache in enumerate((alone[2], alone[0])):
        by_itself = attend(q[row : row + 1], k[row : row + 1], v[row : row + 1], cache, 0.125)
        np.testing.assert_allclose(np.array(together[row : row + 1]), np.array(by_itself),
                                   atol=2e-6)  # fmt: skip


def test_batched_turboquant_decoding_equals_one_at_a_time() -> None:
    loaded = load_moe(default_model_path(), kv_bits=3)
    engine = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new)
    scheduler = build_engine(loaded, draft=False, max_batch=4)
    assert loaded.tokenizer is not None
    texts = ("import os\n", "def main(argv):\n    ", "class Cache:\n    def __init__")
    inputs = [loaded.tokenizer.encode(t) for t in texts]
    want = [engine.generate(p, SamplingParams(max_tokens=10)).tokens for p in inputs]
    got = scheduler.generate_batch(inputs, [SamplingParams(max_tokens=10)] * 3)  # type: ignore[attr-defined]
    assert [g.tokens for g in got] == want


def test_a_batch_refuses_a_row_of_other_bits() -> None:
    batch = BatchTurboQuantCache(3)
    with pytest.raises(ValueError, match="4-bit TurboQuant cache cannot join a 3-bit batch"):
        batch.add_row(TurboQuantKVCache(4))
