"""The release's multi-token-prediction module (``mtp.0.*``) as a speculative drafter.

At position ``i`` the module reads the next token's embedding and the target's residual
streams at ``i`` (before the final collapse): ``e_proj(enorm(embed(x[i+1]))) + h_proj(
hnorm(streams[i]))`` feeds one decoder block of its own, whose collapsed, normalised output goes
through the target's head to predict ``x[i+2]``. Drafting chains it: each guess and the block's
own output streams feed the next step. The block keeps a cache like any attention layer; what
it computed from its own guesses is trimmed before the next proposal, and the target's real
streams for the committed positions take their place.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mach.decode.sampler import Sampler
from mach.decode.speculative import Draft, Drafter, DraftGate
from mach.env import env_flag
from mach.experts.store import ResidentStackedExpertCache
from mach.experts.swap import bind_switches, swap_switch_mlp
from mach.io.checkpoint import Checkpoint
from mach.io.load import LoadedModel
from mach_adapter_deepseek.config import ModelArgs
from mach_adapter_deepseek.hyper import HyperHead
from mach_adapter_deepseek.model import DecoderLayer, Model, rotary_tables
from mach_adapter_deepseek.moe import expert_activation

DRAFT_ENV = "LME_V4_DRAFT"
DEFAULT_GATE = DraftGate(rho=0.6, min_tokens=0)
"""Draft only what the MTP head is at least 60% sure of (``benchmarks/deepseek_v4_mtp.py``)."""


class MtpModule(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        h, eps = args.hidden_size, args.rms_norm_eps
        self.e_proj = nn.Linear(h, h, bias=False)
        self.h_proj = nn.Linear(h, h, bias=False)
        self.enorm = nn.RMSNorm(h, eps=eps)
        self.hnorm = nn.RMSNorm(h, eps=eps)
        self.norm = nn.RMSNorm(h, eps=eps)
        self.hc_head = HyperHead(args.hc_mult, h, args.hc_eps, eps)
        self.layers = [DecoderLayer(args, args.mtp_layer_type, False, rotary_tables(args))]

    def __call__(self, target: Model, tokens: mx.array, streams: mx.array,
                 cache: Any) -> tuple[mx.array, mx.array]:  # fmt: skip
        """``(logits [B, L, V], streams [B, L, n, H])`` for pairs (tokens, target streams)."""
        e = self.e_proj(self.enorm(target.model.embed_tokens(tokens)))
        x = e[:, :, None] + self.h_proj(self.hnorm(streams))
        out = self.layers[0](x, tokens, cache)
        return target.unembed(self.norm(self.hc_head(out))), out


_OWN = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.")


def _mtp_weights(ckpt: Checkpoint, config: dict[str, Any]) -> dict[str, mx.array]:
    """``mtp.0.*`` -> the module's names: its own tensors as they are, its block as layer 0."""
    from mach_adapter_deepseek.checkpoint import engine_name, stack_experts, unpack

    raw: dict[str, mx.array] = {}
    for file in ckpt.files:
        loaded = mx.load(str(file))
        assert isinstance(loaded, dict)
        raw.update(
            {k.removeprefix("mtp.0."): v for k, v in loaded.items() if k.startswith("mtp.0.")}
        )
    out: dict[str, mx.array] = {}
    for name, value in unpack(raw, config).items():
        if name.startswith(_OWN):
            out[name] = value
        elif name.startswith("hc_head_"):
            out[f"hc_head.hc_{name.removeprefix('hc_head_')}"] = value
        else:
            out[str(engine_name(f"layers.0.{name}", prefix="layers."))] = value
    stack_experts(out)
    return out


def load_mtp(target: Model, ckpt: Checkpoint, config: dict[str, Any]) -> MtpModule | None:
    """The checkpoint's MTP module with its experts resident, or ``None`` if it ships none."""
    path = ckpt.path
    weights = _mtp_weights(ckpt, config)
    if not weights:
        return None
    mtp = MtpModule(target.args)
    dtype = target.model.embed_tokens.weight.dtype
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}  # fmt: skip
    switches = bind_switches(mtp, expert_activation(target.args), False, "deepseek_v4 MTP")
    store = ResidentStackedExpertCache.from_weights(weights, switches, lambda _: str(path), True)
    store.materialize(lambda _: None)
    swap_switch_mlp(mtp, store, None)
    mtp.load_weights(list(weights.items()), strict=True)
    mx.eval(mtp.parameters())
    mtp.eval()
    return mtp


class MtpDrafter(Drafter):
    needs_hidden = True
    default_gate = DEFAULT_GATE

    def __init__(self, target: Model, mtp: MtpModule) -> None:
        self.target, self.mtp = target, mtp
        self.reset()

    def reset(self) -> None:
        self.cache = self.mtp.layers[0].self_attn.new_cache()
        self._tokens: list[mx.array] = []
        self._streams: list[mx.array] = []
        self._guessed = 0

    def observe(self, next_tokens: mx.array, hidden: mx.array | None) -> None:
        assert hidden is not None
        self._tokens.append(next_tokens)
        self._streams.append(hidden)

    def propose(self, k: int, sampler: Sampler, gate: DraftGate) -> Draft:
        self.cache.trim(self._guessed)
        self._guessed = 0
        tokens = mx.concatenate(self._tokens)[None]
        streams = mx.concatenate(self._streams, axis=1)
        self._tokens, self._streams = [], []
        logits, out = self.mtp(self.target, tokens, streams, self.cache)
        logits, out = logits[:, -1:], out[:, -1:]
        greedy = sampler.params.temperature == 0
        drafted: list[int] = []
        dists: list[mx.array] = []
        confidence: list[float] = []
        while True:
            row = logits[0].astype(mx.float32)
            logprobs = sampler.logprobs(row) if not greedy else row - mx.logsumexp(row, -1, True)
            token = mx.argmax(logprobs, -1) if greedy else mx.random.categorical(
                logprobs, key=sampler.next_key())  # fmt: skip
            chosen = mx.take_along_axis(logprobs, token[:, None], -1)
            chosen = mx.exp(chosen - mx.logsumexp(logprobs, -1, True))
            mx.eval(token, chosen)  # one sync for both
            conf = float(chosen.item())
            if not gate.keeps(len(drafted), conf):
                break
            drafted.append(int(token.item()))
            dists.append(logprobs)
            confidence.append(conf)
            if len(drafted) == k:
                break
            # This pair holds a guess, not a committed token: dropped before the next proposal.
            logits, out = self.mtp(self.target, token[None].astype(mx.uint32), out, self.cache)
            self._guessed += 1
        return Draft(drafted, mx.concatenate(dists) if dists else None, confidence)


def make_mtp_drafter(loaded: LoadedModel) -> Drafter | None:
    """``register_drafters`` factory: the MTP drafter, unless switched off or absent."""
    target = loaded.model
    if not env_flag(DRAFT_ENV, True) or not isinstance(target, Model):
        return None
    if not any(name.startswith("mtp.0.") for name in loaded.checkpoint.tensor_names):
        return None
    mtp = load_mtp(target, loaded.checkpoint, loaded.checkpoint.config)
    return None if mtp is None else MtpDrafter(target, mtp)
