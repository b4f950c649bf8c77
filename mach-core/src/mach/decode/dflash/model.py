"""The DFlash draft network: a few Qwen3-style layers that denoise a block of mask tokens.

It has no embedding or output head of its own; it borrows the target's. The target's hidden
states at ``target_layer_ids`` (concatenated) go through ``fc`` and ``hidden_norm`` into one
context row per committed position. In every layer, those rows become extra keys and values
(kept in the draft's cache; no input norm on them), and the block rows attend to all of the
context and to each other, without a mask. Row ``i`` of the block's output predicts the token
at that same position, so rows ``1..`` of ``[anchor, mask, mask, ...]`` are the drafts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from mach.cache.kv import KVCache
from mach.cache.traced_kv import TracedKVCache
from mach.decode.dflash.config import DFlashConfig
from mach.layers.attention import attend_block
from mach.layers.mlp import GatedMLP
from mach.layers.rope import make_rope


class DraftAttention(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        h, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)  # fmt: skip
        bias = bool(config.raw.get("attention_bias", False))
        self.q_proj = nn.Linear(h, self.heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=config.rms_norm_eps)
        self.rope = make_rope(hd, config.raw)

    def _split(self, x: mx.array, heads: int) -> mx.array:
        b, length, _ = x.shape
        return x.reshape(b, length, heads, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, context: mx.array, cache: KVCache | TracedKVCache) -> mx.array:
        """``x``: the block's normed rows; ``context``: new context rows (may be empty)."""
        # Context rows then block rows take consecutive positions from the cache's offset.
        rows = mx.concatenate([context, x], axis=1) if context.shape[1] else x
        start = cache.offset
        keys = self.rope(self.k_norm(self._split(self.k_proj(rows), self.kv_heads)), start)
        values = self._split(self.v_proj(rows), self.kv_heads)
        block_at = start + context.shape[1]
        q = self.rope(self.q_norm(self._split(self.q_proj(x), self.heads)), block_at)
        scale = self.head_dim**-0.5
        if isinstance(cache, TracedKVCache):
            out = cache.attend_written(q, keys, values, scale)
        else:
            cache.update_and_fetch(keys, values)
            # The block is a guess, not context: its rows leave the cache again (still in the
            # buffer for this call, past the offset).
            cache.trim(x.shape[1])
            out = attend_block(q, cache, cache.offset + x.shape[1], scale, causal=False)
        b, _, length, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class DraftLayer(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.self_attn = DraftAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, context: mx.array, cache: KVCache | TracedKVCache) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), context, cache)
        out: mx.array = x + self.mlp(self.post_attention_layernorm(x))
        return out


class DFlashDraftModel(nn.Module):
    """``draft(block_ids, features, caches) -> hidden``; the caller applies the target's head."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.layers = [DraftLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(h, eps=config.rms_norm_eps)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def context(self, features: mx.array) -> mx.array:
        """Concatenated target hidden states ``[B, L, n*H]`` -> context rows ``[B, L, H]``."""
        out: mx.array = self.hidden_norm(self.fc(features))
        return out

    def __call__(
        self,
        block: mx.array,
        features: mx.array,
        cache: Sequence[KVCache | TracedKVCache],
        embed: Callable[[mx.array], mx.array],
    ) -> mx.array:
        """``block [B, S]`` token ids, ``features [B, L, n*H]`` for the positions committed since
        the last call (``L`` may be 0). Returns the block's final normed hidden states."""
        context = self.context(features)
        x = embed(block)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x = layer(x, context, layer_cache)
        out: mx.array = self.norm(x)
        return out
