"""``DFlashDrafter``: a whole block of drafts from one pass of the DFlash draft network.

The verify pass and the rollback are ``SpecDecEngine``'s; this module loads the draft, keeps its
context cache (only verified positions enter it, so it never rolls back) and sizes the block
from the acceptance it measures.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mach.cache.kv import KVCache
from mach.cache.traced_kv import TracedKVCache
from mach.decode.compiled import MAX_COMPILED_TOKENS, compile_blocker, over_caches
from mach.decode.dflash.config import DFlashConfig, draft_folder, read_dflash_config
from mach.decode.dflash.model import DFlashDraftModel
from mach.decode.sampler import Sampler
from mach.decode.speculative import Draft, Drafter, DraftGate
from mach.errors import CheckpointError, MissingFileError

if TYPE_CHECKING:
    from mach.io.load import LoadedModel


class AdaptiveBlock:
    """The block size to draft next, from the acceptance of recent verify passes.

    A full block pays off only while most of it is accepted. After a window of full blocks
    accepting under a quarter of their drafts, the drafter drafts ``small`` tokens for
    ``hold`` passes, then probes full blocks again.
    """

    def __init__(self, small: int = 3, window: int = 4, hold: int = 32) -> None:
        self.small, self.window, self.hold = small, window, hold
        self.recent: deque[float] = deque(maxlen=window)
        self.reduced_left = 0

    def size(self, full: int) -> int:
        return min(full, self.small) if self.reduced_left else full

    def record(self, proposed: int, accepted: int, full: int) -> None:
        if self.reduced_left:
            self.reduced_left -= 1
            return
        if proposed == full and proposed > self.small:
            self.recent.append(accepted / proposed)
            if len(self.recent) == self.window and sum(self.recent) / self.window < 0.25:
                self.reduced_left, self.recent = self.hold, deque(maxlen=self.window)


class DFlashDrafter(Drafter):
    """Drafts ``[anchor, mask, ...]`` in one pass, conditioned on the target's hidden states at
    the draft's ``target_layer_ids`` (``hidden_layers``)."""

    def __init__(self, target: object, draft: DFlashDraftModel, compiled: bool = False) -> None:
        self.target, self.draft = target, draft
        self.config = draft.config
        self.hidden_layers: tuple[int, ...] = self.config.target_layer_ids
        self.default_draft_tokens = self.config.block_size - 1
        self.block = AdaptiveBlock()
        self._compiled = over_caches(self._best) if compiled else None
        self.compiled = 0
        """Draft passes that ran as a compiled graph."""
        self.reset()

    def _best(self, cache: Sequence[KVCache | TracedKVCache], block: mx.array,
              features: mx.array) -> mx.array:  # fmt: skip
        """The draft's logits for the block's mask rows (float32)."""
        embed = self.target.model.embed  # type: ignore[attr-defined]
        hidden = self.draft(block, features.astype(self.draft.fc.weight.dtype), cache, embed)
        logits: mx.array = self.target.head(hidden[:, 1:])[0]  # type: ignore[attr-defined]
        return logits.astype(mx.float32)

    def _logits(self, block: mx.array, features: mx.array) -> mx.array:
        writes = features.shape[1] + block.shape[1]
        if (self._compiled is None or writes > MAX_COMPILED_TOKENS or self.cache[0].keys is None
                or compile_blocker() is not None):  # fmt: skip
            return self._best(self.cache, block, features)
        self.compiled += 1
        logits: mx.array = self._compiled(self.cache, writes, features.shape[1], block, features)
        return logits

    def reset(self) -> None:
        self.cache = self.draft.make_cache()
        self.pending: list[mx.array] = []
        self.anchor: int | None = None
        self.proposed = 0
        self._full = 0  # the block asked for by the last proposal

    def observe(self, next_tokens: mx.array, hidden: mx.array | None) -> None:
        if hidden is None:
            raise ValueError("DFlash drafts from the target's hidden states; none were given")
        if self.anchor is not None and self.proposed:
            # A verify pass: as many committed as accepted, plus the target's own token.
            self.block.record(self.proposed, next_tokens.size - 1, self._full)
        self.pending.append(hidden)
        last: list[int] = next_tokens[-1:].tolist()  # type: ignore[assignment]
        self.anchor = last[0]
        self.proposed = 0

    def propose(self, k: int, sampler: Sampler, gate: DraftGate) -> Draft:
        if self.anchor is None or k <= 0:
            return Draft([], None, [])
        self._full = k
        n = self.block.size(k)
        features = mx.concatenate(self.pending, axis=1) if self.pending else None
        self.pending = []
        block = mx.array([[self.anchor] + [self.config.mask_token_id] * n], dtype=mx.uint32)
        if features is None:
            width = self.config.hidden_size * len(self.config.target_layer_ids)
            features = mx.zeros((1, 0, width), dtype=self.draft.fc.weight.dtype)
        logits = self._logits(block, features)
        best = mx.argmax(logits, axis=-1)
        if gate.rho == 0 and sampler.params.temperature == 0:
            # Nothing here needs the tokens yet: the verify pass queues behind this one.
            mx.async_eval(best)
            self.proposed = best.size
            return Draft([], None, [1.0] * best.size, ids=best)
        if gate.rho > 0:  # the gate reads the draft's own probability of each token
            sure = mx.exp(mx.max(logits, axis=-1) - mx.logsumexp(logits, axis=-1))
            mx.eval(best, sure)  # one wait for both
            confidence: list[float] = sure.tolist()  # type: ignore[assignment]
        else:
            confidence = [1.0] * best.size
        tokens: list[int] = best.tolist()  # type: ignore[assignment]
        kept = 0
        while kept < len(tokens) and gate.keeps(kept, confidence[kept]):
            kept += 1
        tokens, confidence = tokens[:kept], confidence[:kept]
        self.proposed = kept
        logprobs = None
        if sampler.params.temperature != 0 and kept:
            # Greedy drafts are point masses: the verify step then accepts each with the
            # target's own probability of it, which keeps sampling exact.
            onehot = mx.arange(logits.shape[-1])[None] == mx.array(tokens)[:, None]
            logprobs = mx.where(onehot, 0.0, -mx.inf)
        return Draft(tokens, logprobs, confidence)


def load_dflash(folder: Path, loaded: LoadedModel) -> DFlashDrafter:
    """The DFlash draft in ``folder`` (``config.json`` + ``model.safetensors``), bound to the
    loaded target. Raises a ``MachError`` naming what does not fit the target."""
    model = loaded.model
    if not hasattr(model, "head") or not hasattr(getattr(model, "model", None), "embed"):
        raise CheckpointError(
            f"{folder}: {loaded.adapter.name} targets do not expose their hidden states to a "
            "DFlash draft"
        )
    # The final norm's width, not the embedding's: a quantized embedding packs its rows.
    hidden = model.model.norm.weight.shape[0]
    vocab = model.model.embed_tokens.weight.shape[0]
    config = read_dflash_config(folder, hidden, len(model.layers), vocab)
    tokenizer = loaded.tokenizer
    if tokenizer is not None and config.mask_token_id >= tokenizer.vocab_size:
        raise CheckpointError(
            f"{folder}: mask_token_id {config.mask_token_id} is not in the tokenizer "
            f"({tokenizer.vocab_size} tokens)"
        )
    draft = DFlashDraftModel(config)
    weights = _read_weights(config)
    expected = {k for k, _ in _flat(draft)}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{folder}: the draft's tensors do not match its config: "
            + (f"missing {missing[:3]}" if missing else "")
            + (" " if missing and extra else "")
            + (f"unexpected {extra[:3]}" if extra else "")
        )
    for name, value in _flat(draft):
        if weights[name].shape != value.shape:
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(weights[name].shape)}, the config implies "
                f"{tuple(value.shape)}"
            )
    dtype = model.model.embed_tokens.weight.dtype
    if dtype not in (mx.float32, mx.float16, mx.bfloat16):
        dtype = mx.float32 if weights["fc.weight"].dtype == mx.float32 else mx.bfloat16
    draft.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=True)
    mx.eval(draft.parameters())  # type: ignore[no-untyped-call]
    return DFlashDrafter(model, draft, compiled=loaded.passes is not None)


def _flat(draft: DFlashDraftModel) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    flat: list[tuple[str, mx.array]] = tree_flatten(draft.parameters())  # type: ignore[no-untyped-call,assignment]
    return [(k, v) for k, v in flat if isinstance(v, mx.array)]


def _read_weights(config: DFlashConfig) -> dict[str, mx.array]:
    files = sorted(config.path.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{config.path}: no .safetensors file with the draft's weights")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            loaded = mx.load(str(file))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({exc})") from exc
        assert isinstance(loaded, dict)
        # Some exports nest the draft under ``model.``; the published layout has no prefix.
        weights.update({k.removeprefix("model."): v for k, v in loaded.items()})
    return weights


def make_dflash_drafter(loaded: LoadedModel) -> DFlashDrafter | None:
    """``register_drafters`` factory for ``specdec_v7``: the DFlash draft beside the checkpoint
    or named by ``draft_path``, or ``None`` when there is none."""
    folder = draft_folder(loaded.checkpoint.path, loaded.options.draft_path)
    return None if folder is None else load_dflash(folder, loaded)
