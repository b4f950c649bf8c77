"""The decoder-only language model frame families share: embed, layers, norm, output head.

Weight names follow the checkpoints: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``
and ``lm_head`` (absent when the head is tied to the embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from mach.layers.pipeline import PipelineStage


class DecoderStack(nn.Module):
    """Token embedding, the family's decoder layers (``layer(h, cache)``), final RMSNorm."""

    stage: PipelineStage | None = None
    """This rank's run of layers under pipeline parallelism (``mach.layers.pipeline``)."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: list[Any], eps: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = layers
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def embed(self, tokens: mx.array) -> mx.array:
        """The first residual stream (a family that scales its embedding overrides this)."""
        out: mx.array = self.embed_tokens(tokens)
        return out

    def __call__(
        self, tokens: mx.array, cache: Sequence[Any] | None, taps: Sequence[int] = ()
    ) -> tuple[mx.array, list[mx.array]]:
        """The normed last hidden state, and the residual stream after each layer in ``taps``
        (what a draft conditioned on the target's hidden states reads)."""
        h = self.embed(tokens)
        tapped = []
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
            if i in taps:
                tapped.append(h)
        if self.stage is not None:
            tapped_at = [i for i in range(len(self.layers)) if i in taps]
            outputs = [(len(self.layers) - 1, h), *zip(tapped_at, tapped, strict=True)]
            h, *tapped = self.stage.share(outputs, len(self.layers))
        out: mx.array = self.norm(h)
        return out, tapped


class CausalLM(nn.Module):
    """``model(tokens [B, L], cache=None) -> logits [B, L, vocab]`` over a ``DecoderStack``.

    With ``hidden_layers``, it returns ``(logits, features)``: the residual stream after those
    layers, concatenated on the last axis in the order given.
    """

    def __init__(self, model: DecoderStack, tie_word_embeddings: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.model = model
        self.tied = tie_word_embeddings
        if not tie_word_embeddings:
            vocab, hidden = model.embed_tokens.weight.shape
            self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def head(self, h: mx.array) -> mx.array:
        """Output logits from normed hidden states."""
        out: mx.array = self.model.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)
        return out

    def __call__(
        self,
        tokens: mx.array,
        cache: Sequence[Any] | None = None,
        hidden_layers: Sequence[int] | None = None,
    ) -> Any:
        h, tapped = self.model(tokens, cache, hidden_layers or ())
        logits = self.head(h)
        if hidden_layers is None:
            return logits
        order = sorted(set(hidden_layers))
        return logits, mx.concatenate([tapped[order.index(i)] for i in hidden_layers], axis=-1)

    @property
    def layers(self) -> list[Any]:
        return self.model.layers
