"""TurboQuant: keys and values stored as a norm and a few bits per coordinate.

Each head vector is rotated by a seeded random-sign Hadamard transform, which makes its
coordinates nearly independent and Gaussian, whatever the vector's outliers. Each rotated
coordinate is then rounded to the nearest centroid of the Lloyd-Max quantizer for that Gaussian
(2, 3 or 4 bits), and the vector's norm is kept, corrected so the reconstruction has the
original length. Attention runs in the rotated space: the rotation is orthogonal, so
``<q, k> = <Πq, Πk>``; queries are rotated once per step and the output is rotated back once.
How a step reads the stored codes depends on the device (``attend_rows``): CUDA kernels read
them in place, a CPU expands them with NumPy, and otherwise MLX ops expand them for the call.
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
import numpy as np

from mach.cache.affine_kv import compute_dtype
from mach.cache.batch_kv import visible_rows
from mach.cache.positions import AppendOnlyPositions
from mach.cache.snapshot import LayerState, check_kind, present
from mach.cache.turboquant_host import host_attention, host_available
from mach.cache.turboquant_kernels import (
    FUSED_BLOCK,
    encode,
    fits,
    fused_attention,
    fused_available,
)

BITS = (2, 3, 4)
LLOYD_ITERATIONS = 400


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2))))


@cache
def lloyd_max(bits: int) -> np.ndarray:
    """The ``2**bits`` centroids of the mean-squared-error optimal quantizer of N(0, 1).

    Lloyd's iteration: thresholds at the midpoints of neighbouring centroids, each centroid at
    the mean of the Gaussian between its thresholds (``(pdf(a) - pdf(b)) / (cdf(b) - cdf(a))``).
    """
    if bits not in BITS:
        raise ValueError(f"TurboQuant stores 2, 3 or 4 bits per coordinate, not {bits}")
    levels = 2**bits
    centroids = np.linspace(-2.5, 2.5, levels)
    for _ in range(LLOYD_ITERATIONS):
        edges = np.concatenate([[-np.inf], (centroids[1:] + centroids[:-1]) / 2, [np.inf]])
        low, high = edges[:-1], edges[1:]
        mass = _normal_cdf(high) - _normal_cdf(low)
        centroids = (_normal_pdf(low) - _normal_pdf(high)) / mass
    return centroids.astype(np.float32)


def distortion(bits: int) -> float:
    """Mean squared error per coordinate of :func:`lloyd_max` on N(0, 1), by integration."""
    grid = np.linspace(-8, 8, 200001)
    centroids = lloyd_max(bits)
    nearest = centroids[np.abs(grid[:, None] - centroids[None]).argmin(axis=1)]
    weight = _normal_pdf(grid)
    return float(np.sum((grid - nearest) ** 2 * weight) / np.sum(weight))


class TurboQuantCodec:
    """Encode ``[..., dim]`` vectors to packed centroid indices and norms, and back.

    ``seed`` fixes the rotation's signs; keys and values use different seeds.
    """

    def __init__(self, dim: int, bits: int, seed: int) -> None:
        if dim & (dim - 1) or dim < 16:
            raise ValueError(f"TurboQuant needs a power-of-two head_dim of at least 16, got {dim}")
        self.dim, self.bits = dim, bits
        self.per_word = 32 // bits
        self.words = -(-dim // self.per_word)
        signs = np.random.default_rng(seed).integers(0, 2, dim) * 2 - 1
        self.signs = mx.array(signs.astype(np.float32))
        centroids = lloyd_max(bits)
        self.centroids = mx.array(centroids / math.sqrt(dim))
        """In the orthonormal rotated space, where a unit vector's coordinates have variance
        ``1 / dim``."""
        self.thresholds = mx.array((centroids[1:] + centroids[:-1]) / 2 / math.sqrt(dim))
        pad = self.words * self.per_word - dim
        self._pad = pad
        self._shifts = mx.array(np.arange(self.per_word, dtype=np.uint32) * bits)
        # Expanding codes one by one is a gather per coordinate, the slowest step on a CPU. A
        # table from every run of ``group`` codes (at most 16 bits) to their centroids does
        # it in a gather per run: 4, 5 or 8 coordinates at 4, 3 or 2 bits.
        group = next(g for g in range(16 // bits, 0, -1) if self.per_word % g == 0)
        runs = np.arange(2 ** (bits * group))
        table = [centroids[(runs >> (bits * i)) & (2**bits - 1)] for i in range(group)]
        self.run_table = mx.array(np.stack(table, -1) / math.sqrt(dim))
        self.run_shifts = mx.array(np.arange(self.per_word // group, dtype=np.uint32)
                                    * bits * group)  # fmt: skip
        self.run_mask = 2 ** (bits * group) - 1

    def rotate(self, x: mx.array) -> mx.array:
        """``Πx``: random signs, then the orthonormal Hadamard transform."""
        return mx.hadamard_transform(x.astype(mx.float32) * self.signs)

    def unrotate(self, y: mx.array) -> mx.array:
        """``Πᵀy``."""
        return mx.hadamard_transform(y.astype(mx.float32)) * self.signs

    def encode(self, x: mx.array) -> mx.array:
        """Packed rows ``uint32 [..., words + 1]`` of ``x [..., dim]``: the centroid indices,
        then the float32 bits of the norm, corrected so the rebuilt vector keeps its length."""
        norm = mx.linalg.norm(x.astype(mx.float32), axis=-1)
        unit = self.rotate(x) / mx.maximum(norm, 1e-12)[..., None]
        idx = (unit[..., None] > self.thresholds).sum(axis=-1).astype(mx.uint32)
        rebuilt = mx.linalg.norm(self.centroids[idx], axis=-1)
        corrected = norm / mx.maximum(rebuilt, 1e-12)
        return mx.concatenate([self.pack(idx), mx.view(corrected, mx.uint32)[..., None]], axis=-1)

    def decode_rotated(self, rows: mx.array) -> mx.array:
        """The vectors of packed ``rows`` in the rotated space, ``n · c[idx]`` (float32)."""
        packed, norm = rows[..., :-1], mx.view(rows[..., -1], mx.float32)
        runs = (packed[..., None] >> self.run_shifts) & self.run_mask
        values = self.run_table[runs].reshape(*packed.shape[:-1], -1)[..., : self.dim]
        return values * norm[..., None]

    def decode(self, rows: mx.array) -> mx.array:
        return self.unrotate(self.decode_rotated(rows))

    def pack(self, idx: mx.array) -> mx.array:
        if self._pad:
            idx = mx.concatenate([idx, mx.zeros((*idx.shape[:-1], self._pad), mx.uint32)], -1)
        grouped = idx.reshape(*idx.shape[:-1], self.words, self.per_word)
        return (grouped << self._shifts).sum(axis=-1).astype(mx.uint32)

    def unpack(self, packed: mx.array) -> mx.array:
        mask = (1 << self.bits) - 1
        idx = (packed[..., None] >> self._shifts) & mask
        return idx.reshape(*packed.shape[:-1], self.words * self.per_word)[..., : self.dim]

    @property
    def row_words(self) -> int:
        """uint32 words per stored vector: its codes and its norm."""
        return self.words + 1

    def nbytes_per_vector(self) -> int:
        return 4 * self.row_words


KEY_SEED, VALUE_SEED = 0x7B5EED, 0x7B5EEE


def codecs_for(dim: int, bits: int) -> tuple[TurboQuantCodec, TurboQuantCodec]:
    """The key and value codecs of every TurboQuant cache of ``bits`` with heads of ``dim``."""
    return _codec(dim, bits, KEY_SEED), _codec(dim, bits, VALUE_SEED)


def encode_rows(keys: mx.array, values: mx.array,
                codecs: tuple[TurboQuantCodec, TurboQuantCodec],
                positions: int) -> tuple[mx.array, mx.array]:  # fmt: skip
    """Packed rows of ``[B, H, L, D]`` keys and values for a cache that will hold
    ``positions``: by the encode kernel on a CUDA GPU, else by MLX ops."""
    kc, vc = codecs
    if fused_available() and fits(kc.dim, positions):
        k_rows, v_rows = encode(keys, values, codecs)
        return k_rows, v_rows
    return kc.encode(keys), vc.encode(values)


def attend_rows(
    queries: mx.array,
    codecs: tuple[TurboQuantCodec, TurboQuantCodec],
    stored: tuple[mx.array, mx.array],
    positions: int,
    scale: float,
    mask: str | None,
    sinks: mx.array | None,
    padding: list[int] | None = None,
) -> mx.array:
    """Attention of ``queries`` over the first ``positions`` of packed ``(k_rows, v_rows)``,
    in the rotated space; ``padding`` hides each batch row's leading positions.

    Decode-sized blocks on a CUDA GPU take the kernels, which read the rows in place, and on
    a CPU over long contexts NumPy's lookups; other blocks expand the rows to centroids once
    and make one fused attention call.
    """
    kc, vc = codecs
    length = queries.shape[2]
    if length <= FUSED_BLOCK and fits(kc.dim, positions) and fused_available():
        return fused_attention(queries, codecs, stored, positions, scale, mask == "causal",
                               sinks, tuple(padding) if padding is not None else None)  # fmt: skip
    if length <= FUSED_BLOCK and host_available(positions):
        return host_attention(queries, codecs, stored, positions, scale, mask == "causal",
                              sinks, padding)  # fmt: skip
    visible: str | mx.array | None = mask
    if padding is not None:
        visible = visible_rows(padding, length, positions, None)
    dtype = compute_dtype(queries.dtype)
    k_rot = kc.decode_rotated(stored[0][:, :, :positions])
    v_rot = vc.decode_rotated(stored[1][:, :, :positions])
    out = mx.fast.scaled_dot_product_attention(
        kc.rotate(queries).astype(dtype), k_rot.astype(dtype), v_rot.astype(dtype),
        scale=scale, mask=visible, sinks=sinks,
    )  # fmt: skip
    return vc.unrotate(out).astype(queries.dtype)


STATE = ("k_rows", "v_rows")


def _grow(held: mx.array | None, new_shape: tuple[int, ...], dtype: mx.Dtype, used: int,
          need: int, step: int) -> mx.array:  # fmt: skip
    """``held`` with room for ``need`` positions along axis 2 (grown in ``step`` chunks)."""
    if held is not None and held.shape[2] >= need:
        return held
    size = -(-need // step) * step
    fresh = mx.zeros((*new_shape[:2], size, *new_shape[3:]), dtype)
    if held is not None and used:
        fresh[:, :, :used] = held[:, :, :used]
    return fresh


class TurboQuantKVCache(AppendOnlyPositions):
    """A full-attention layer's keys and values as TurboQuant codes (``bits`` per coordinate).

    ``k_rows`` and ``v_rows`` (``uint32 [B, H, positions, words + 1]``) hold one packed row
    per head vector, its norm in the last word, so a write is one update per tensor and a
    step reads one buffer per tensor. Every position is quantized as it is written, so
    prefill, decode and a prefix restored from the cache all attend over the same codes.
    """

    label = "TurboQuant cache"
    kind = "turboquant"
    step = 256

    def __init__(self, bits: int = 3) -> None:
        lloyd_max(bits)  # checks bits
        self.bits = bits
        self._offset = 0
        self.k_rows: mx.array | None = None
        self.v_rows: mx.array | None = None
        self._codecs: tuple[TurboQuantCodec, TurboQuantCodec] | None = None

    def codecs(self, dim: int) -> tuple[TurboQuantCodec, TurboQuantCodec]:
        if self._codecs is None or self._codecs[0].dim != dim:
            self._codecs = codecs_for(dim, self.bits)
        return self._codecs

    def update(self, keys: mx.array, values: mx.array) -> None:
        """Quantize and append ``[B, H, L, D]`` keys and values."""
        kc, vc = self.codecs(keys.shape[-1])
        b, h, new, _ = keys.shape
        if new == 0:
            return
        prev, end = self._offset, self._offset + new
        k_rows, v_rows = encode_rows(keys, values, (kc, vc), end)
        shape = (b, h, 0, kc.row_words)
        self.k_rows = _grow(self.k_rows, shape, mx.uint32, prev, end, self.step)
        self.v_rows = _grow(self.v_rows, shape, mx.uint32, prev, end, self.step)
        self.k_rows[:, :, prev:end] = k_rows
        self.v_rows[:, :, prev:end] = v_rows
        self._offset = end

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float,
               mask: str | None, sinks: mx.array | None = None) -> mx.array:  # fmt: skip
        """Append the new keys and values, then attention of ``queries`` over every stored
        position, computed in the rotated space (on a CUDA GPU, by kernels that read the codes
        for decode-sized blocks)."""
        self.update(keys, values)
        kc, vc = self.codecs(keys.shape[-1])
        assert self.k_rows is not None and self.v_rows is not None
        return attend_rows(queries, (kc, vc), (self.k_rows, self.v_rows), self._offset, scale,
                           mask, sinks)  # fmt: skip

    def dequantized(self) -> tuple[mx.array, mx.array]:
        """Keys and values as attention sees them, back in the model's space (for tests)."""
        assert self.k_rows is not None and self.v_rows is not None
        kc, vc = self._codecs or self.codecs(0)
        end = self._offset
        return kc.decode(self.k_rows[:, :, :end]), vc.decode(self.v_rows[:, :, :end])

    def export_state(self) -> LayerState:
        end = self._offset
        arrays = {}
        if end and self.k_rows is not None and self.v_rows is not None:
            arrays = {"k_rows": self.k_rows[:, :, :end], "v_rows": self.v_rows[:, :, :end]}
        dim = self._codecs[0].dim if self._codecs is not None else 0
        return LayerState(self.kind, present(**arrays),
                          {"offset": end, "bits": self.bits, "head_dim": dim})  # fmt: skip

    def load_state(self, state: LayerState) -> None:
        check_kind(state, self.kind)
        if state.meta["bits"] != self.bits:
            raise ValueError(f"a {state.meta['bits']}-bit TurboQuant state cannot load into a "
                             f"{self.bits}-bit cache")  # fmt: skip
        self._offset = end = int(state.meta["offset"])
        self.k_rows = self.v_rows = None
        if not end:
            return
        self.codecs(int(state.meta["head_dim"]))
        # Copied into fresh buffers, so later writes never reach the stored snapshot.
        for name in STATE:
            rows = state.arrays[name]
            held = _grow(None, (*rows.shape[:2], 0, rows.shape[3]), rows.dtype, 0, end, self.step)
            held[:, :, :end] = rows
            setattr(self, name, held)

    @property
    def state(self) -> tuple[mx.array, ...] | None:
        if self.k_rows is None or self.v_rows is None:
            return None
        return self.k_rows[:, :, : self._offset], self.v_rows[:, :, : self._offset]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k_rows, self.v_rows) if a is not None)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the positions held (``nbytes`` counts the grown buffers)."""
        if self._codecs is None or self.k_rows is None:
            return 0
        per = sum(c.nbytes_per_vector() for c in self._codecs)
        return per * self.k_rows.shape[0] * self.k_rows.shape[1] * self._offset


@cache
def _codec(dim: int, bits: int, seed: int) -> TurboQuantCodec:
    return TurboQuantCodec(dim, bits, seed)
