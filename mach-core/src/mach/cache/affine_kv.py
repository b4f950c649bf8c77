"""``AffineKVCache``: keys and values in MLX's affine 4- or 8-bit format, the plain baseline.

Each group of ``group_size`` coordinates keeps a scale and a bias. A decode step's scores and
output are MLX's fused quantized matmuls over the stored codes (where MLX has them, see
``fused_decode``); a prefill chunk dequantizes them for one fused attention call.
"""

from __future__ import annotations

import mlx.core as mx

from mach.cache.positions import AppendOnlyPositions
from mach.cache.snapshot import LayerState, check_kind, present
from mach.errors import OptionsError

AFFINE_BITS = (4, 8)


def compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """float32 on a CPU, whose quantized kernels are several times slower in half precision."""
    return mx.float32 if mx.default_device() == mx.cpu else dtype


def fused_decode() -> bool:
    """Whether MLX has quantized matmuls over batched, cached keys here (its CUDA backend
    does not yet; there a step dequantizes for one fused attention call instead)."""
    return mx.default_device() == mx.cpu or mx.metal.is_available()


PARTS = ("k_q", "k_scales", "k_biases", "v_q", "v_scales", "v_biases")


class AffineKVCache(AppendOnlyPositions):
    label = "affine KV cache"
    kind = "affine_kv"
    step = 256

    def __init__(self, bits: int = 8, group_size: int = 64) -> None:
        if bits not in AFFINE_BITS:
            raise ValueError(f"affine KV stores 4 or 8 bits, not {bits}")
        self.bits, self.group_size = bits, group_size
        self._offset = 0
        self._held: dict[str, mx.array] = {}

    def _group(self, dim: int) -> int:
        if dim % 32:
            raise OptionsError(f"affine KV needs a head_dim that is a multiple of 32 (MLX's "
                               f"smallest group), this model's is {dim}; use --kv-format "
                               "turboquant")  # fmt: skip
        return min(self.group_size, dim)

    def update(self, keys: mx.array, values: mx.array) -> None:
        prev, end = self._offset, self._offset + keys.shape[2]
        work = compute_dtype(keys.dtype)
        keys, values = keys.astype(work), values.astype(work)
        group = self._group(keys.shape[-1])
        parts = dict(zip(PARTS[:3], mx.quantize(keys, group_size=group, bits=self.bits),
                         strict=True))  # fmt: skip
        parts.update(zip(PARTS[3:], mx.quantize(values, group_size=group, bits=self.bits),
                         strict=True))  # fmt: skip
        for name, new in parts.items():
            held = self._held.get(name)
            if held is None or held.shape[2] < end:
                size = -(-end // self.step) * self.step
                grown = mx.zeros((*new.shape[:2], size, new.shape[3]), new.dtype)
                if held is not None and prev:
                    grown[:, :, :prev] = held[:, :, :prev]
                held = grown
            held[:, :, prev:end] = new
            self._held[name] = held
        self._offset = end

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float,
               mask: str | mx.array | None, sinks: mx.array | None = None) -> mx.array:  # fmt: skip
        self.update(keys, values)
        end, group = self._offset, self._group(keys.shape[-1])
        k = [self._held[n][:, :, :end] for n in PARTS[:3]]
        v = [self._held[n][:, :, :end] for n in PARTS[3:]]
        b, heads, length, dim = queries.shape
        kv_heads = k[0].shape[1]
        if length > 1 or not fused_decode():
            full_k = mx.dequantize(k[0], k[1], k[2], group, self.bits).astype(queries.dtype)
            full_v = mx.dequantize(v[0], v[1], v[2], group, self.bits).astype(queries.dtype)
            return mx.fast.scaled_dot_product_attention(queries, full_k, full_v, scale=scale,
                                                        mask=mask, sinks=sinks)  # fmt: skip
        work = compute_dtype(queries.dtype)
        grouped = (queries.astype(work) * scale).reshape(b, kv_heads, heads // kv_heads, 1, dim)
        k = [a[:, :, None] for a in k]
        v = [a[:, :, None] for a in v]
        scores = mx.quantized_matmul(grouped, k[0], k[1], k[2], True, group, self.bits)
        scores = scores.astype(mx.float32)
        if sinks is not None:  # a learned logit per head that takes part in the softmax
            sink = sinks.astype(mx.float32).reshape(1, kv_heads, heads // kv_heads, 1, 1)
            scores = mx.concatenate([mx.broadcast_to(sink, (*scores.shape[:-1], 1)), scores], -1)
        weights = mx.softmax(scores, axis=-1)[..., -end:].astype(work)
        out = mx.quantized_matmul(weights, v[0], v[1], v[2], False, group, self.bits)
        return out.reshape(b, heads, 1, dim).astype(queries.dtype)

    def export_state(self) -> LayerState:
        end = self._offset
        arrays = {n: a[:, :, :end] for n, a in self._held.items()} if end else {}
        meta = {"offset": end, "bits": self.bits, "group_size": self.group_size}
        return LayerState(self.kind, present(**arrays), meta)

    def load_state(self, state: LayerState) -> None:
        check_kind(state, self.kind)
        if state.meta["bits"] != self.bits or state.meta["group_size"] != self.group_size:
            raise ValueError("an affine KV state loads only into a cache of its bits and groups")
        self._held, self._offset = {}, 0
        end = int(state.meta["offset"])
        for name, stored in state.arrays.items():
            size = -(-end // self.step) * self.step
            held = mx.zeros((*stored.shape[:2], size, stored.shape[3]), stored.dtype)
            held[:, :, :end] = stored
            self._held[name] = held
        self._offset = end

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._held.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of the positions held (``nbytes`` counts the grown buffers)."""
        return sum(a[:, :, : self._offset].nbytes for a in self._held.values())
