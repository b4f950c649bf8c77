"""DeepSeek-V4 MTP draft: acceptance length and expert loads per token, with and without it.

mlx-lm has no DeepSeek-V4 model to run as a peer, so the comparison is mach's speculative
engine against mach's target-only engine on the same checkpoint and the same expert bank.

The checkpoint is the synthesized release-format fixture (FP8 matrices, FP4 experts). Its MTP
module starts random, which would accept nothing, so the benchmark first distils it on the
target's own greedy continuations (the MTP head learns to predict the token after next from the
target's streams), the way a released MTP head is trained alongside its model. Routed experts
stream from the sidecar through a bank that holds half of them, so every expert the target
touches and does not hold is a disk read ("load").

    python -m benchmarks.deepseek_v4_mtp [--steps 300] [--tokens 64]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.sampler import Sampler
from mach.decode.speculative import Draft, Drafter, DraftGate, SpecDecEngine
from mach.io.checkpoint import open_checkpoint
from mach.io.convert import convert
from mach_adapter_deepseek.mtp import MtpDrafter, load_mtp

sys.path.insert(0, str(Path(__file__).parent))
from harness import Run, alternate, per_round_ratio, report, spread

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "deepseek_v4" / "upstream-fp8"


def distil(model: nn.Module, mtp: nn.Module, steps: int, batch: int = 64, seed: int = 0) -> float:
    """Train the MTP module's dense weights on the target's own next-token predictions.

    The data is what drafting will see: random 12-token prompts continued greedily by the
    target (batched). For pair ``(x[i+1], streams[i])`` the label is the target's argmax at
    ``i + 1``: exactly what verification compares the first draft with.
    """
    rng = np.random.default_rng(seed)
    rows: list[mx.array] = []
    for _ in range(4):
        tokens = mx.array(rng.integers(3, 500, size=(256, 12)))
        cache = model.make_cache()
        logits = model(tokens, cache=cache)
        for _ in range(36):
            nxt = mx.argmax(logits[:, -1:], axis=-1)
            tokens = mx.concatenate([tokens, nxt], axis=1)
            logits = model(nxt, cache=cache)
            mx.eval(tokens, logits)
        rows.append(tokens)
    data = mx.concatenate(rows)
    streams, labels = [], []
    for start in range(0, data.shape[0], 64):
        logits, hidden = model(data[start : start + 64], return_hidden=True)
        streams.append(hidden)
        labels.append(mx.argmax(logits, axis=-1))
        mx.eval(streams[-1], labels[-1])
    hidden_all, label_all = mx.concatenate(streams), mx.concatenate(labels)
    mtp.freeze()
    mtp.unfreeze(keys=["weight"], strict=False)
    for layer in mtp.layers:
        layer.mlp.freeze()

    def loss_fn(module: nn.Module, tokens: mx.array, hidden: mx.array,
                target: mx.array) -> mx.array:  # fmt: skip
        logits, _ = module(model, tokens[:, 1:], hidden[:, :-1], None)
        return nn.losses.cross_entropy(logits, target[:, 1:]).mean()

    opt = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(mtp, loss_fn)
    loss = mx.array(0.0)
    for _ in range(steps):
        pick = mx.array(rng.integers(0, data.shape[0], size=batch))
        loss, grads = step(mtp, data[pick], hidden_all[pick], label_all[pick])
        opt.update(mtp, grads)
        mx.eval(mtp.parameters(), opt.state)
    return float(loss.item())


class OracleDrafter(Drafter):
    """The target drafting for itself: its greedy continuation, each draft replaced by a wrong
    token with probability ``1 - alpha``. It runs a resident copy of the target, so its own
    expert reads do not count; it shows how expert loads per token follow acceptance."""

    needs_hidden = False

    def __init__(self, model: nn.Module, alpha: float, seed: int = 0) -> None:
        self.model, self.alpha = model, alpha
        self.rng = np.random.default_rng(seed)
        self.first = 0

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.pending: list[int] = [self.first]
        self.guessed = 0

    def observe(self, next_tokens: mx.array, hidden: mx.array | None) -> None:
        self.pending += next_tokens.tolist()  # type: ignore[operator]

    def propose(self, k: int, sampler: Sampler, gate: DraftGate) -> Draft:
        for layer in self.cache:
            layer.trim(self.guessed)
        logits = self.model(mx.array([self.pending]), cache=self.cache)[0, -1]
        self.pending, drafted = [], []
        for i in range(k):
            token = int(mx.argmax(logits).item())
            if self.rng.random() > self.alpha:
                token = (token + 1) % logits.shape[-1]
            drafted.append(token)
            if i + 1 < k:
                logits = self.model(mx.array([[token]]), cache=self.cache)[0, -1]
        self.guessed = k - 1
        return Draft(drafted, None, [1.0] * k)


def run(engine: object, store: object, prompts: list[list[int]], tokens: int) -> Run:
    """Every prompt through ``engine``; a pass is a target forward that yields tokens: the
    prefill (its first token) and then each decode step or draft-verify cycle."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    before = store.stats()["decode"]  # type: ignore[attr-defined]
    ids: list[int] = []
    generated = passes = accepted = drafted = prompt_tokens = 0
    prefill_s = decode_s = 0.0
    for prompt in prompts:
        drafter = getattr(engine, "drafter", None)
        if isinstance(drafter, OracleDrafter):
            drafter.first = prompt[0]
        result = engine.generate(prompt, params)  # type: ignore[attr-defined]
        stats = result.stats
        ids += result.tokens
        prompt_tokens += stats.prompt_tokens
        generated += stats.generation_tokens
        passes += stats.target_passes
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
        prefill_s += stats.prompt_seconds
        decode_s += stats.generation_seconds
    loads = store.stats()["decode"]["misses"] - before["misses"]  # type: ignore[attr-defined]
    out = Run(prompt_tokens, ids, prefill_s, decode_s, streams=len(prompts))
    out.figures = {"tokens_per_pass": generated / passes,
                   "accept_rate": accepted / drafted if drafted else float("nan"),
                   "decode_loads_per_token": loads / generated}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64, help="Sequences per distillation step.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Path(tmp) / "sidecar"
        convert(FIXTURE, sidecar)
        model, _, store, cache = load_moe(sidecar, expert_budget="70KB")
        source = open_checkpoint(FIXTURE)
        mtp = load_mtp(model, source, source.config)
        assert mtp is not None
        loss = distil(model, mtp, args.steps, args.batch)
        print(f"MTP distilled for {args.steps} steps: loss {loss:.3f} "
              f"({len(tree_flatten(mtp.trainable_parameters()))} trained tensors)")  # fmt: skip
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, 500, size=12).tolist() for _ in range(4)]
        engines: list[tuple[str, object]] = [("target only", TargetEngine(model, None, cache.new))]
        shadow, _, _, _ = load_moe(FIXTURE)
        for alpha in (1.0, 0.7):
            for k in (1, 3):
                oracle = OracleDrafter(shadow, alpha)
                engines.append((f"oracle a={alpha} k={k}",
                                SpecDecEngine(model, None, cache.new, oracle, k)))  # fmt: skip
        for k in (1, 3):
            for rho in (0.0, 0.3, 0.6):
                gate = DraftGate(rho, 0 if rho else 1)
                mtp_engine = SpecDecEngine(model, None, cache.new, MtpDrafter(model, mtp), k, gate)
                engines.append((f"MTP k={k} rho={rho}", mtp_engine))
        # Every engine shares the one bank, so each is warmed up and measured in turn, round
        # by round: none of them meets a colder bank than another.
        results = alternate(
            [(name, functools.partial(run, e, store, prompts, args.tokens)) for name, e in engines],
            args.rounds,
        )
        report(results, "target only", f"deepseek_v4 fixture, bank of 70 KB, {len(prompts)} "
               f"prompts x {args.tokens} tokens")  # fmt: skip
        base = results["target only"]
        for name, runs in results.items():
            ratio = per_round_ratio(runs, base, "decode_loads_per_token")
            print(f"    {name}: decode loads per token x{spread(ratio, '{:.2f}')} of target only")
    os.environ.pop("LME_RHO_GATE", None)


if __name__ == "__main__":
    main()
