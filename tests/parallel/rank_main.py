"""Run on every rank by ``mlx.launch``: load, take logits and greedy tokens; rank 0 saves them.

mlx.launch -n 2 --backend ring python tests/parallel/rank_main.py CHECKPOINT OUT.npz \
    [--budget BYTES] [--parallel pipeline] [--dtype bfloat16] [--draft] [--draft-path DIR]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from mach import load_moe
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine

PROMPT = [5, 9, 200, 17, 3, 44, 101, 7]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--parallel", default="expert")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--draft", action="store_true")
    parser.add_argument("--draft-path")
    args = parser.parse_args()
    residency = {"expert_budget": args.budget} if args.budget else {"streaming": False}
    loaded = load_moe(
        args.checkpoint,
        dtype=args.dtype,
        parallel=args.parallel,
        compile=False,
        draft_path=args.draft_path,
        **residency,
    )
    logits = loaded.model(mx.array([PROMPT]))
    mx.eval(logits)  # every rank joins every exchange
    engine = build_engine(loaded, draft=args.draft or False, max_batch=1)
    result = engine.generate(PROMPT, SamplingParams(max_tokens=16))
    shard = loaded.shard
    held = [
        int(
            loaded.store.layer(p).source.spec.num_experts
            if args.budget
            else loaded.store.layer(p).weights.down.num_experts
        )
        for p in loaded.store.layers
    ]
    if shard is None or shard.rank == 0:
        np.savez(
            args.out,
            logits=np.array(logits.astype(mx.float32)),
            tokens=np.array(result.tokens),
            verify_passes=np.array(result.stats.verify_passes),
            ranks=np.array(1 if shard is None else shard.size),
            held=np.array(held),
        )


if __name__ == "__main__":
    main()
