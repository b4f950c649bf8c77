"""The DeepSeek-V4 language model: hyper-connected decoder blocks over ``hc_mult`` streams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from mach.cache.base import LayerCache
from mach_adapter_deepseek.attention import Attention
from mach_adapter_deepseek.config import SLIDING, ModelArgs
from mach_adapter_deepseek.hyper import HyperConnection, HyperHead, expand
from mach_adapter_deepseek.moe import MoeBlock
from mach_adapter_deepseek.rope import RotaryTable

if TYPE_CHECKING:
    from mach.layers.pipeline import PipelineStage


def rotary_tables(args: ModelArgs) -> dict[str, RotaryTable]:
    """Sliding layers rotate with the plain table, compressed layers with the YaRN one."""
    return {
        "main": RotaryTable(args.qk_rope_head_dim, args.rope_theta, None),
        "compress": RotaryTable(
            args.qk_rope_head_dim, args.compress_rope_theta, args.compress_rope
        ),
    }


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, hashed: bool,
                 tables: dict[str, RotaryTable]) -> None:  # fmt: skip
        super().__init__()  # type: ignore[no-untyped-call]
        h, eps = args.hidden_size, args.rms_norm_eps
        rope = tables["main" if kind == SLIDING else "compress"]
        self.self_attn = Attention(args, kind, rope)
        self.mlp = MoeBlock(args, hashed)
        self.input_layernorm = nn.RMSNorm(h, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=eps)
        self.attn_hc = HyperConnection(args.hc_mult, h, args.hc_sinkhorn_iters, args.hc_eps, eps)
        self.ffn_hc = HyperConnection(args.hc_mult, h, args.hc_sinkhorn_iters, args.hc_eps, eps)

    def __call__(self, streams: mx.array, tokens: mx.array, cache: Any) -> mx.array:
        collapsed, post, comb = self.attn_hc(streams)
        out = self.self_attn(self.input_layernorm(collapsed), cache)
        streams = expand(streams, out, post, comb)
        collapsed, post, comb = self.ffn_hc(streams)
        out = self.mlp(self.post_attention_layernorm(collapsed), tokens)
        return expand(streams, out, post, comb)


class DeepseekV4Model(nn.Module):
    stage: PipelineStage | None = None
    """This rank's run of layers under pipeline parallelism (``mach.layers.pipeline``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        tables = rotary_tables(args)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, kind, mlp == "hash_moe", tables)
            for kind, mlp in zip(args.layer_types, args.mlp_layer_types, strict=True)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hc_head = HyperHead(args.hc_mult, args.hidden_size, args.hc_eps, args.rms_norm_eps)
        self.hc_mult = args.hc_mult

    def streams(self, tokens: mx.array, cache: Sequence[Any] | None) -> mx.array:
        """The residual streams ``[B, L, hc_mult, H]`` after the last block."""
        h = self.embed_tokens(tokens)
        streams = mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.hc_mult, h.shape[-1]))
        for i, layer in enumerate(self.layers):
            streams = layer(streams, tokens, cache[i] if cache is not None else None)
        if self.stage is not None:
            (streams,) = self.stage.share([(len(self.layers) - 1, streams)], len(self.layers))
        return streams


class Model(nn.Module):
    """``model(tokens, cache) -> logits``; ``return_hidden`` adds the final streams (for MTP)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.args = args
        self.model = DeepseekV4Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Sequence[Any] | None = None,
                 return_hidden: bool = False) -> Any:  # fmt: skip
        streams = self.model.streams(tokens, cache)
        logits = self.head(streams)
        return (logits, streams) if return_hidden else logits

    def head(self, streams: mx.array) -> mx.array:
        return self.unembed(self.model.norm(self.model.hc_head(streams)))

    def unembed(self, h: mx.array) -> mx.array:
        """Hidden states -> logits, through the embedding itself when the two are tied."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        out: mx.array = self.lm_head(h)
        return out

    @property
    def layers(self) -> list[Any]:
        return self.model.layers

    def make_cache(self) -> list[LayerCache]:
        return [layer.self_attn.new_cache() for layer in self.layers]
