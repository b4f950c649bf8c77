"""TurboQuant attention on a CPU through NumPy, for decode-sized blocks over long contexts.

Expanding stored codes to centroids is a table lookup per run of codes. MLX's CPU gather
costs about 30 ns per index here, NumPy's ``take`` about 1 ns, and NumPy's matrix products
run on the same BLAS; so on a CPU a step reads the rows as NumPy views (no copy), expands
them there, attends in float32 and hands MLX only the output. Reading the rows evaluates the
graph so far, which a CPU does at every layer anyway; below ``HOST_MIN`` positions that wait
costs more than the gather it saves.

The products run in the calling thread (``threadpoolctl``): they are a few rows against the
context, bound by memory, and a second BLAS thread pool left spinning beside MLX's own
threads halved decode speed on a 2-core machine.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from threadpoolctl import ThreadpoolController

from mach.env import env_flag

if TYPE_CHECKING:
    from mach.cache.turboquant import TurboQuantCodec

HOST_MIN = 256
"""Positions from which a decode-sized block attends through NumPy on a CPU."""


def host_available(positions: int) -> bool:
    """Whether a decode-sized block over ``positions`` attends through NumPy here.

    ``MACH_TURBOQUANT_HOST=0`` keeps every block on MLX (to compare the two).
    """
    return (positions >= HOST_MIN and mx.default_device() == mx.cpu
            and env_flag("MACH_TURBOQUANT_HOST", True))  # fmt: skip


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


@functools.cache
def _tables(codec: TurboQuantCodec) -> tuple[np.ndarray, np.ndarray, int]:
    """The codec's run table, run shifts and run mask as NumPy arrays."""
    return (np.array(codec.run_table), np.array(codec.run_shifts), codec.run_mask)


def expand(codec: TurboQuantCodec, packed: np.ndarray) -> np.ndarray:
    """Packed codes (``uint32 [..., words]``) as their centroids ``float32 [..., words *
    per_word]``, the same values ``TurboQuantCodec.decode_rotated`` takes before the norm;
    coordinates past ``dim`` are padding."""
    table, shifts, mask = _tables(codec)
    if mask == 0xFFFF:  # runs of 16 bits (2 and 4 bits per code) are the words' halves
        runs = packed.view(np.uint16)
    else:
        # One contiguous pass per run: a broadcast shift over the strided rows is ten times
        # slower.
        runs = np.empty((*packed.shape, len(shifts)), np.uint16)
        for i, shift in enumerate(shifts.tolist()):
            np.bitwise_and(packed >> np.uint32(shift), mask, out=runs[..., i], casting="unsafe")
    return np.take(table, runs, axis=0).reshape(*packed.shape[:-1], -1)


def host_attention(
    queries: mx.array,
    codecs: tuple[TurboQuantCodec, TurboQuantCodec],
    stored: tuple[mx.array, mx.array],
    positions: int,
    scale: float,
    causal: bool,
    sinks: mx.array | None,
    padding: list[int] | None = None,
) -> mx.array:
    """``queries [B, Hq, L, D]`` over the first ``positions`` of packed ``(k_rows, v_rows)``,
    as ``attend_rows`` computes it, in float32."""
    kc, vc = codecs
    b, hq, length, dim = queries.shape
    k_rows = np.asarray(stored[0][:, :, :positions])
    v_rows = np.asarray(stored[1][:, :, :positions])
    keys, values = expand(kc, k_rows[..., :-1]), expand(vc, v_rows[..., :-1])
    k_norms, v_norms = k_rows[..., -1].view(np.float32), v_rows[..., -1].view(np.float32)
    hk, width = keys.shape[1], keys.shape[-1]
    group = hq // hk
    # Query head h reads key head h // group; its rows sit together, one per query position.
    # Zeros past dim meet the padding codes' centroids.
    q = np.zeros((b, hk, group * length, width), np.float32)
    q[..., :dim] = np.asarray(kc.rotate(queries).astype(mx.float32)).reshape(b, hk, -1, dim)
    hidden = None
    if causal and length > 1:
        later = np.arange(positions)[None] > np.arange(positions - length, positions)[:, None]
        hidden = np.tile(later, (group, 1))
    sink = None
    if sinks is not None:
        per_head = np.asarray(sinks.astype(mx.float32)).reshape(hk, group, 1)
        sink = np.repeat(per_head, length, axis=1)
    out = np.empty((b, hk, group * length, width), np.float32)
    # One pair of 2-D products per head: NumPy hands those to BLAS, not stacked ones.
    with _blas().limit(limits=1, user_api="blas"):
        for i in range(b):
            for h in range(hk):
                scores = (q[i, h] @ keys[i, h].T) * (k_norms[i, h] * scale)
                if hidden is not None:
                    scores[hidden] = -np.inf
                if padding:
                    scores[:, : padding[i]] = -np.inf
                top = scores.max(axis=-1, keepdims=True)
                if sink is not None:
                    top = np.maximum(top, sink[h])
                weights = np.exp(scores - top)
                total = weights.sum(axis=-1, keepdims=True)
                if sink is not None:
                    total += np.exp(sink[h] - top)
                out[i, h] = ((weights * v_norms[i, h]) @ values[i, h]) / total
    result = out[..., :dim].reshape(b, hq, length, dim)
    return vc.unrotate(mx.array(result)).astype(queries.dtype)
