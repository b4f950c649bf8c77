"""Attention over TurboQuant codes on a CUDA GPU, reading the codes where they lie.

The portable path expands every stored code to its centroid at every step, writing and then
reading back a float copy of the whole cache. Here two kernels read the packed words
directly: one scores each rotated query row against every key (a thread per row and
position), one accumulates the softmax-weighted values (a thread per row and coordinate over
a chunk of positions; the chunks' sums are added after). The softmax between them is MLX's.
Only decode-sized query blocks take this path; a prefill chunk expands its codes once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mach.env import env_flag

if TYPE_CHECKING:
    from mach.cache.turboquant import TurboQuantCodec

FUSED_BLOCK = 64
"""The longest query block scored by the kernels (verify passes and draft blocks fit)."""
VALUE_CHUNK = 128
"""Positions one thread of the value kernel sums before the chunks are added."""

# Which query row, head and centroids a thread works with; shared by both kernels.
_ROW = """
    const int L = q_shape[2];
    const int Hq = q_shape[1];
    const int Hk = codes_shape[1];
    const int cap = codes_shape[2];
    const int W = codes_shape[3];
    const int T = norms_shape[2];
    const int l = row % L;
    const int hq = (row / L) % Hq;
    const int b = row / (L * Hq);
    const size_t head = (size_t)b * Hk + hq / (Hq / Hk);
    float cent[1 << BITS];
    for (int i = 0; i < (1 << BITS); ++i) cent[i] = centroids[i];
"""

_SCORES = """
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int row = blockIdx.y;
    if (t >= norms_shape[2]) return;
    ROW
    const int D = q_shape[3];
    float score;
    if (CAUSAL && t > T - L + l) {
        score = -__int_as_float(0x7f800000);  // -infinity
    } else {
        const uint32_t* word = codes + (head * cap + t) * W;
        const float* qr = q + (size_t)row * D;
        float acc = 0.0f;
        int d = 0;
        for (int w = 0; w < W; ++w) {
            const uint32_t packed = word[w];
            for (int j = 0; j < PER_WORD && d < D; ++j, ++d) {
                acc += qr[d] * cent[(packed >> (j * BITS)) & ((1u << BITS) - 1)];
            }
        }
        score = acc * norms[head * T + t];
    }
    scores[(size_t)row * T + t] = score;
"""

_VALUES = """
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    const int row = blockIdx.z;
    const int D = q_shape[3];
    if (d >= D) return;
    ROW
    const int chunks = gridDim.y;
    const uint32_t* column = codes + head * cap * W + d / PER_WORD;
    const int shift = (d % PER_WORD) * BITS;
    const float* pr = probs + (size_t)row * T;
    const float* nr = norms + head * T;
    const int start = chunk * CHUNK;
    const int stop = min(T, start + CHUNK);
    float acc = 0.0f;
    for (int t = start; t < stop; ++t) {
        acc += pr[t] * nr[t] * cent[(column[(size_t)t * W] >> shift) & ((1u << BITS) - 1)];
    }
    partial[((size_t)row * chunks + chunk) * D + d] = acc;
"""


def fused_available() -> bool:
    """Whether TurboQuant attention runs through the CUDA kernels here.

    ``MACH_TURBOQUANT_KERNEL=0`` keeps the portable path (to compare the two).
    """
    return (mx.default_device() != mx.cpu and mx.cuda.is_available()
            and env_flag("MACH_TURBOQUANT_KERNEL", True))  # fmt: skip


@functools.cache
def _kernels() -> tuple[Any, Any]:
    scores = mx.fast.cuda_kernel(
        name="mach_turboquant_scores", input_names=["q", "codes", "norms", "centroids"],
        output_names=["scores"], source=_SCORES.replace("ROW", _ROW),
    )  # fmt: skip
    values = mx.fast.cuda_kernel(
        name="mach_turboquant_values", input_names=["q", "codes", "norms", "centroids", "probs"],
        output_names=["partial"], source=_VALUES.replace("ROW", _ROW),
    )  # fmt: skip
    return scores, values


def fused_attention(
    queries: mx.array,
    codecs: tuple[TurboQuantCodec, TurboQuantCodec],
    stored: tuple[mx.array, mx.array, mx.array, mx.array],
    positions: int,
    scale: float,
    causal: bool,
    sinks: mx.array | None,
) -> mx.array:
    """``queries [B, Hq, L, D]`` over the first ``positions`` of the stored codes.

    ``stored`` is the cache's ``(k_codes, k_norms, v_codes, v_norms)`` buffers (their position
    axis may run past ``positions``); the result is in the model's space, like
    ``mx.fast.scaled_dot_product_attention``'s.
    """
    kc, vc = codecs
    k_codes, k_norms, v_codes, v_norms = stored
    b, hq, length, dim = queries.shape
    rows = b * hq * length
    q = kc.rotate(queries) * scale
    score_kernel, value_kernel = _kernels()
    # The norms sliced to the positions held tell the kernels how many there are.
    k_norms, v_norms = k_norms[:, :, :positions], v_norms[:, :, :positions]
    template: list[tuple[str, Any]] = [("BITS", kc.bits), ("PER_WORD", kc.per_word)]
    (scores,) = score_kernel(
        inputs=[q, k_codes, k_norms, kc.centroids],
        template=[*template, ("CAUSAL", causal and length > 1)],
        grid=(positions, rows, 1), threadgroup=(min(256, positions), 1, 1),
        output_shapes=[(b, hq, length, positions)], output_dtypes=[mx.float32],
    )  # fmt: skip
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(mx.float32)[None, :, None, None], (b, hq, length, 1))
        probs = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1)[..., :positions]
    else:
        probs = mx.softmax(scores, axis=-1)
    chunks = -(-positions // VALUE_CHUNK)
    (partial,) = value_kernel(
        inputs=[q, v_codes, v_norms, vc.centroids, probs],
        template=[("BITS", vc.bits), ("PER_WORD", vc.per_word), ("CHUNK", VALUE_CHUNK)],
        grid=(dim, chunks, rows), threadgroup=(dim, 1, 1),
        output_shapes=[(rows, chunks, dim)], output_dtypes=[mx.float32],
    )  # fmt: skip
    out = partial.sum(axis=1).reshape(b, hq, length, dim)
    return vc.unrotate(out).astype(queries.dtype)
