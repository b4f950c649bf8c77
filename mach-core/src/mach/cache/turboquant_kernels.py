"""TurboQuant on a CUDA GPU: three kernels in place of dozens of small ops.

The portable path builds every write and every step from MLX ops (a rotation, a norm, a
threshold count, packing; then expanding every stored code to its centroid at every step).
On a GPU each of those ops costs a launch, and a decode step of a small model is bound by
launches, not by bytes. Here:

- ``encode`` quantizes a pass's new keys and values in one launch: a block per vector
  rotates it in shared memory (random signs, then a fast Walsh-Hadamard transform), rounds
  each coordinate to its Lloyd-Max centroid, packs the codes and corrects the norm.
- ``attend`` scores one query row against a chunk of 128 positions straight from the
  packed key codes (the query is rotated in the block), takes the chunk's softmax statistics,
  and sums the chunk's value codes weighted by them (split-K "flash decoding").
- ``combine`` merges a row's chunks with their maxima, adds the attention sink, rotates the
  result back and writes it.

Only decode-sized query blocks attend here; a prefill chunk expands its codes once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mach.env import env_flag

if TYPE_CHECKING:
    from mach.cache.turboquant import TurboQuantCodec

FUSED_BLOCK = 64
"""The longest query block attended by the kernels (verify passes and draft blocks fit)."""
CHUNK = 128
"""Positions per block of the attend kernel; also every kernel's thread count per block."""
MAX_DIM = 1024
MAX_CHUNKS = 4096
"""The combine kernel keeps a row's chunk weights in shared memory (512K positions)."""

_HEADER = """
#define MACH_NEG_INF (-__int_as_float(0x7f800000))

// Sum (or max) over the block; every thread gets the result. blockDim.x is a multiple of 32.
__device__ inline float mach_block_reduce(float v, float* scratch, bool take_max) {
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = take_max ? fmaxf(v, other) : v + other;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = scratch[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); ++i) {
        total = take_max ? fmaxf(total, scratch[i]) : total + scratch[i];
    }
    return total;
}

// The unnormalised Walsh-Hadamard transform of buf[0:n] in shared memory, in place.
__device__ inline void mach_hadamard(float* buf, int n) {
    __syncthreads();
    for (int h = 1; h < n; h <<= 1) {
        for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
            const int j = (i / h) * 2 * h + (i % h);
            const float a = buf[j], b = buf[j + h];
            buf[j] = a + b;
            buf[j + h] = a - b;
        }
        __syncthreads();
    }
}
"""

_ENCODE = """
    const int D = keys_shape[3];
    const size_t vectors = (size_t)keys_shape[0] * keys_shape[1] * keys_shape[2];
    const bool is_value = blockIdx.x >= vectors;
    const size_t n = blockIdx.x - (is_value ? vectors : 0);
    const auto* x = (is_value ? values : keys) + n * D;
    const float* signs = is_value ? v_signs : k_signs;
    const float* thresholds = is_value ? v_thresholds : k_thresholds;
    const float* centroids = is_value ? v_centroids : k_centroids;
    const int W = (D + PER_WORD - 1) / PER_WORD;
    __shared__ float buf[1024];
    __shared__ float scratch[32];
    __shared__ uint32_t words[1024];
    float squares = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float v = static_cast<float>(x[d]);
        squares += v * v;
        buf[d] = v * signs[d];
    }
    for (int w = threadIdx.x; w < W; w += blockDim.x) words[w] = 0u;
    const float norm = sqrtf(mach_block_reduce(squares, scratch, false));
    mach_hadamard(buf, D);
    const float unit = rsqrtf((float)D) / fmaxf(norm, 1e-12f);
    float rebuilt = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float y = buf[d] * unit;
        uint32_t idx = 0u;
        for (int i = 0; i < (1 << BITS) - 1; ++i) idx += y > thresholds[i] ? 1u : 0u;
        const float c = centroids[idx];
        rebuilt += c * c;
        atomicOr(&words[d / PER_WORD], idx << ((d % PER_WORD) * BITS));
    }
    rebuilt = sqrtf(mach_block_reduce(rebuilt, scratch, false));
    uint32_t* rows = (is_value ? v_rows : k_rows) + n * (W + 1);
    for (int w = threadIdx.x; w < W; w += blockDim.x) rows[w] = words[w];
    if (threadIdx.x == 0) rows[W] = __float_as_uint(norm / fmaxf(rebuilt, 1e-12f));
"""

_ATTEND = """
    const int chunk = blockIdx.x;
    const int chunks = gridDim.x;
    const int row = blockIdx.y;
    const int Hq = q_shape[1], L = q_shape[2], D = q_shape[3];
    const int Hk = k_rows_shape[1], T = k_rows_shape[2], W = k_rows_shape[3] - 1;
    const int l = row % L, hq = (row / L) % Hq, b = row / (L * Hq);
    const int hk = hq / (Hq / Hk);
    const unsigned mask = (1u << BITS) - 1u;
    __shared__ float qs[1024];
    __shared__ float weights[CHUNK];
    __shared__ float scratch[32];
    const auto* qr = q + b * q_strides[0] + hq * q_strides[1] + l * q_strides[2];
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        qs[d] = static_cast<float>(qr[d * q_strides[3]]) * k_signs[d];
    }
    mach_hadamard(qs, D);
    // v_rows is the whole buffer behind the k_rows view: both are grown alike.
    const size_t head = b * k_rows_strides[0] + hk * k_rows_strides[1];
    const size_t stride = k_rows_strides[2];
    const float q_scale = scale[0] * rsqrtf((float)D);
    const int t = chunk * CHUNK + threadIdx.x;
    float score = MACH_NEG_INF;
    float v_norm = 0.0f;
    if (t < T && t >= padding[b] && !(CAUSAL && t > T - L + l)) {
        const uint32_t* word = k_rows + head + t * stride;
        float acc = 0.0f;
        int d = 0;
        for (int w = 0; d < D; ++w) {
            const uint32_t packed = word[w];
            for (int j = 0; j < PER_WORD && d < D; ++j, ++d) {
                acc += qs[d] * k_centroids[(packed >> (j * BITS)) & mask];
            }
        }
        score = acc * q_scale * __uint_as_float(word[W]);
        v_norm = __uint_as_float(v_rows[head + t * stride + W]);
    }
    const float top = mach_block_reduce(score, scratch, true);
    const float p = score == MACH_NEG_INF ? 0.0f : __expf(score - top);
    weights[threadIdx.x] = p * v_norm;
    const float total = mach_block_reduce(p, scratch, false);
    const int held = min(CHUNK, T - chunk * CHUNK);
    const uint32_t* vbase = v_rows + head + (size_t)chunk * CHUNK * stride;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const uint32_t* column = vbase + d / PER_WORD;
        const int shift = (d % PER_WORD) * BITS;
        float acc = 0.0f;
        for (int i = 0; i < held; ++i) {
            acc += weights[i] * v_centroids[(column[i * stride] >> shift) & mask];
        }
        partial[((size_t)row * chunks + chunk) * D + d] = acc;
    }
    if (threadIdx.x == 0) {
        stats[((size_t)row * chunks + chunk) * 2] = top;
        stats[((size_t)row * chunks + chunk) * 2 + 1] = total;
    }
"""

_COMBINE = """
    const int row = blockIdx.x;
    const int Hq = q_shape[1], L = q_shape[2], D = q_shape[3];
    const int chunks = partial_shape[1];
    const float* st = stats + (size_t)row * chunks * 2;
    __shared__ float weights[MAX_CHUNKS];
    __shared__ float buf[1024];
    __shared__ float scratch[32];
    float top = MACH_NEG_INF;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) top = fmaxf(top, st[2 * c]);
    const float sink = HAS_SINKS ? static_cast<float>(sinks[(row / L) % Hq]) : MACH_NEG_INF;
    top = fmaxf(mach_block_reduce(top, scratch, true), sink);
    float total = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const float w = st[2 * c] == MACH_NEG_INF ? 0.0f : __expf(st[2 * c] - top);
        weights[c] = w;
        total += w * st[2 * c + 1];
    }
    total = mach_block_reduce(total, scratch, false);
    if (HAS_SINKS) total += __expf(sink - top);
    const float* pr = partial + (size_t)row * chunks * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int c = 0; c < chunks; ++c) acc += weights[c] * pr[(size_t)c * D + d];
        buf[d] = acc / total;
    }
    mach_hadamard(buf, D);
    const float unit = rsqrtf((float)D);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        out[(size_t)row * D + d] = static_cast<OutT>(buf[d] * unit * v_signs[d]);
    }
"""


def fused_available() -> bool:
    """Whether TurboQuant runs through the CUDA kernels here.

    ``MACH_TURBOQUANT_KERNEL=0`` keeps the portable path (to compare the two).
    """
    return (mx.default_device() != mx.cpu and mx.cuda.is_available()
            and env_flag("MACH_TURBOQUANT_KERNEL", True))  # fmt: skip


def fits(dim: int, positions: int) -> bool:
    """Whether the kernels' shared buffers hold a head of ``dim`` over ``positions``."""
    return dim <= MAX_DIM and -(-positions // CHUNK) <= MAX_CHUNKS


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    encode = mx.fast.cuda_kernel(
        name="mach_turboquant_encode",
        input_names=["keys", "values", "k_signs", "v_signs", "k_thresholds", "v_thresholds",
                     "k_centroids", "v_centroids"],
        output_names=["k_rows", "v_rows"],
        source=_ENCODE, header=_HEADER,
    )  # fmt: skip
    # Strided inputs: the queries as the model hands them over, the cache's keys through a
    # view of the positions held.
    attend = mx.fast.cuda_kernel(
        name="mach_turboquant_attend",
        input_names=["q", "k_rows", "v_rows", "k_signs", "k_centroids", "v_centroids",
                     "scale", "padding"],
        output_names=["partial", "stats"],
        source=_ATTEND, header=_HEADER, ensure_row_contiguous=False,
    )  # fmt: skip
    combine = mx.fast.cuda_kernel(
        name="mach_turboquant_combine",
        input_names=["q", "partial", "stats", "v_signs", "sinks"],
        output_names=["out"],
        source=_COMBINE, header=_HEADER, ensure_row_contiguous=False,
    )  # fmt: skip
    return encode, attend, combine


@functools.cache
def _scalar(value: float) -> mx.array:
    return mx.array([value], mx.float32)


@functools.lru_cache(maxsize=64)
def _padding(rows: tuple[int, ...]) -> mx.array:
    """Each batch row's leading padding positions, as the kernel reads them (kept on the
    device while a batch's padding stays the same)."""
    return mx.array(rows, mx.int32)


def encode(keys: mx.array, values: mx.array,
           codecs: tuple[TurboQuantCodec, TurboQuantCodec]) -> list[mx.array]:  # fmt: skip
    """``[k_rows, v_rows]`` (``uint32 [B, H, L, words + 1]``) of ``[B, H, L, D]`` keys and
    values, as ``TurboQuantCodec.encode`` packs them."""
    kc, vc = codecs
    b, h, length, _ = keys.shape
    kernel = _kernels()[0]
    result: list[mx.array] = kernel(
        inputs=[keys, values.astype(keys.dtype), kc.signs, vc.signs, kc.thresholds,
                vc.thresholds, kc.centroids, vc.centroids],
        template=[("BITS", kc.bits), ("PER_WORD", kc.per_word)],
        grid=(2 * b * h * length * CHUNK, 1, 1), threadgroup=(CHUNK, 1, 1),
        output_shapes=[(b, h, length, kc.row_words)] * 2, output_dtypes=[mx.uint32] * 2,
    )  # fmt: skip
    return result


def fused_attention(
    queries: mx.array,
    codecs: tuple[TurboQuantCodec, TurboQuantCodec],
    stored: tuple[mx.array, mx.array],
    positions: int,
    scale: float,
    causal: bool,
    sinks: mx.array | None,
    padding: tuple[int, ...] | None = None,
) -> mx.array:
    """``queries [B, Hq, L, D]`` over the first ``positions`` of the stored rows.

    ``stored`` is the cache's ``(k_rows, v_rows)`` buffers, alike in shape (their position
    axis may run past ``positions``); ``padding`` hides each batch row's leading positions.
    The result is in the model's space and dtype, like
    ``mx.fast.scaled_dot_product_attention``'s.
    """
    kc, vc = codecs
    k_rows, v_rows = stored
    assert k_rows.shape == v_rows.shape
    b, hq, length, dim = queries.shape
    rows, chunks = b * hq * length, -(-positions // CHUNK)
    _, attend, combine = _kernels()
    partial, stats = attend(
        inputs=[queries, k_rows[:, :, :positions], v_rows, kc.signs, kc.centroids,
                vc.centroids, _scalar(scale), _padding(padding or (0,) * b)],
        template=[("BITS", kc.bits), ("PER_WORD", kc.per_word), ("CHUNK", CHUNK),
                  ("CAUSAL", causal and length > 1)],
        grid=(chunks * CHUNK, rows, 1), threadgroup=(CHUNK, 1, 1),
        output_shapes=[(rows, chunks, dim), (rows, chunks, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )  # fmt: skip
    (out,) = combine(
        inputs=[queries, partial, stats, vc.signs,
                sinks if sinks is not None else _scalar(0.0)],
        template=[("MAX_CHUNKS", MAX_CHUNKS), ("HAS_SINKS", sinks is not None),
                  ("OutT", queries.dtype)],
        grid=(rows * CHUNK, 1, 1), threadgroup=(CHUNK, 1, 1),
        output_shapes=[(b, hq, length, dim)], output_dtypes=[queries.dtype],
    )  # fmt: skip
    result: mx.array = out
    return result
