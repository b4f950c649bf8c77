"""Run on every rank by ``mlx.launch``: load, take logits and greedy tokens; rank 0 prints them.

mlx.launch -n 2 --backend ring python tests/parallel/rank_main.py CHECKPOINT OUT.npz
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams

PROMPT = [5, 9, 200, 17, 3, 44, 101, 7]


def main() -> None:
    checkpoint, out = sys.argv[1], sys.argv[2]
    budget = int(sys.argv[3]) if len(sys.argv) > 3 else None
    residency = {"expert_budget": budget} if budget else {"streaming": False}
    loaded = load_moe(checkpoint, dtype="float32", **residency)
    logits = loaded.model(mx.array([PROMPT]))
    mx.eval(logits)  # every rank joins every all_sum
    engine = TargetEngine(loaded.model, None, loaded.cache.new)
    tokens = engine.generate(PROMPT, SamplingParams(max_tokens=16)).tokens
    shard = loaded.shard
    held = [
        int(
            loaded.store.layer(p).source.spec.num_experts
            if budget
            else loaded.store.layer(p).weights.down.num_experts
        )
        for p in loaded.store.layers
    ]
    if shard is None or shard.rank == 0:
        np.savez(
            out,
            logits=np.array(logits),
            tokens=np.array(tokens),
            ranks=np.array(1 if shard is None else shard.size),
            held=np.array(held),
        )


if __name__ == "__main__":
    main()
