"""DeepSeek-V4 attention: one shared key/value head, a sliding window, compressed entries.

Queries come through a low-rank path (``q_a_proj`` -> norm -> ``q_b_proj``) and a per-head
unweighted RMS norm. Keys and values are the same normalised tensor. Compressed layers add
pooled entries behind the window: every visible one (HCA) or the indexer's top-k (CSA).
Because the values carry the rotation, the output's rotated slice is turned back (inverse
rotation at the query position) before the grouped low-rank output projection.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mach.layers.attention import window_mask
from mach_adapter_deepseek.cache import CompressedCache
from mach_adapter_deepseek.compressor import Compressor, Indexer, visible_entries
from mach_adapter_deepseek.config import CSA, SLIDING, ModelArgs
from mach_adapter_deepseek.rope import RotaryTable


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, rope: RotaryTable) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        h, heads, hd, eps = (args.hidden_size, args.num_attention_heads, args.head_dim,
                             args.rms_norm_eps)  # fmt: skip
        groups = args.o_groups
        self.q_a_proj = nn.Linear(h, args.q_lora_rank, bias=False)
        self.q_a_norm = nn.RMSNorm(args.q_lora_rank, eps=eps)
        self.q_b_proj = nn.Linear(args.q_lora_rank, heads * hd, bias=False)
        self.kv_proj = nn.Linear(h, hd, bias=False)
        self.kv_norm = nn.RMSNorm(hd, eps=eps)
        self.o_a_proj = nn.Linear(heads * hd // groups, groups * args.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(groups * args.o_lora_rank, h, bias=False)
        self.sinks = mx.zeros((heads,))
        self.kind, self.ratio = kind, args.ratio[kind]
        if kind != SLIDING:
            self.compressor = Compressor(h, hd, self.ratio, overlap=kind == CSA, eps=eps)
            if kind == CSA:
                self.compressor.indexer = Indexer(h, args.q_lora_rank, args.index_n_heads,
                                                  args.index_head_dim, self.ratio,
                                                  args.index_topk, eps)  # fmt: skip
        self.heads, self.head_dim, self.groups, self.eps = heads, hd, groups, eps
        self.window = args.sliding_window
        self._rope = rope

    def new_cache(self) -> CompressedCache:
        names = {SLIDING: {}, CSA: {"compressor": self.ratio, "indexer": self.ratio}}
        return CompressedCache(self.window, names.get(self.kind, {"compressor": self.ratio}))

    def __call__(self, x: mx.array, cache: CompressedCache | None) -> mx.array:
        b, length, _ = x.shape
        cache = cache if cache is not None else self.new_cache()
        positions = mx.arange(cache.offset, cache.offset + length)
        rope = self._rope

        q_residual = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_residual).reshape(b, length, self.heads, self.head_dim)
        q32 = q.astype(mx.float32)
        q = (q32 * mx.rsqrt(mx.mean(q32 * q32, axis=-1, keepdims=True) + self.eps)).astype(q.dtype)
        rotation = rope.at(positions)
        q = rotation.apply(q.transpose(0, 2, 1, 3))
        kv = rotation.apply(self.kv_norm(self.kv_proj(x))[:, None])

        first_query = cache.offset
        keys, first_key = cache.update_and_fetch(kv)
        mask = window_mask(length, first_query, keys.shape[2], first_key, self.window)
        if self.kind != SLIDING:
            entries = self.compressor(x, cache.compressors["compressor"], rope)[:, None]
            entries = entries.astype(keys.dtype)  # [B, 1, T, D]
            local = mx.broadcast_to(mask[None], (b, *mask.shape))
            chosen = (self.compressor.indexer(x, q_residual, positions, rotation,
                                              cache.compressors["indexer"], rope)
                      if self.kind == CSA else None)  # fmt: skip
            if chosen is None:
                visible = visible_entries(positions, entries.shape[2], self.ratio)
                extra, extra_mask = entries, mx.broadcast_to(visible[None], (b, *visible.shape))
            elif length == 1:
                # Decode: attend just the picked entries, not a mask over all of them.
                picked, valid = chosen
                extra = mx.take_along_axis(entries, picked[:, :, :, None], axis=2)
                extra_mask = valid
            else:
                picked, valid = chosen
                extra = entries
                extra_mask = mx.put_along_axis(
                    mx.zeros((b, length, entries.shape[2]), dtype=mx.bool_), picked, valid, axis=-1
                )
            keys = mx.concatenate([keys, extra], axis=2)
            mask = mx.concatenate([local, extra_mask], axis=-1)[:, None]
        out = mx.fast.scaled_dot_product_attention(
            q, keys, keys, scale=self.head_dim**-0.5, mask=mask,
            sinks=self.sinks.astype(q.dtype),
        )  # fmt: skip
        out = rotation.apply(out, inverse=True)
        return self.o_b_proj(self._grouped_out(out.transpose(0, 2, 1, 3)))

    def _grouped_out(self, out: mx.array) -> mx.array:
        """Block-diagonal ``o_a_proj``: each head group projects to its own ``o_lora_rank``."""
        b, length = out.shape[:2]
        g = self.groups
        grouped = out.reshape(b * length, g, -1).transpose(1, 0, 2)
        w = self.o_a_proj.weight.reshape(g, -1, grouped.shape[-1])
        mixed = grouped @ w.swapaxes(-1, -2).astype(grouped.dtype)
        return mixed.transpose(1, 0, 2).reshape(b, length, -1)
