"""Expert and pipeline parallelism under ``mlx.launch`` on this machine's loopback: decode speed
at 1, 2 and 4 ranks in each layout, and what each decode step exchanges.

Every configuration decodes the same greedy continuation of the embedded default model (or
``--checkpoint``), resident, float32, no draft; rounds alternate the configurations (who goes first
rotates) and print median and range. Ranks share this machine's cores, so the figures show
the cost of the exchange, not what separate hosts would gain. Exchanges are counted from the
shapes. Expert parallelism: each MoE layer all-sums its routed outputs, ``top_k x hidden``
values per token; a ring all-sum over ``n`` ranks takes ``2 (n - 1)`` messages in sequence and
moves ``2 (n - 1) / n`` of its bytes through each rank. Pipeline parallelism: ``n - 1`` sends of
the hidden state from stage to stage, then one all-sum of it (the last stage's output).

    uv run python benchmarks/parallel.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import default_model_path

PROMPT = [5, 9, 200, 17, 3, 44, 101, 7]


def exchanges(mode: str, ranks: int, layers: int, top_k: int, hidden: int) -> dict[str, float]:
    """Per decode token: bytes through each rank and messages in sequence."""
    if ranks == 1:
        return {"bytes_through_each_rank": 0, "messages": 0}
    ring = 2 * (ranks - 1) / ranks
    value = hidden * mx.float32.size
    if mode == "expert":
        return {"bytes_through_each_rank": layers * top_k * value * ring,
                "messages": layers * 2 * (ranks - 1)}  # fmt: skip
    # A stage sends at most once and receives at most once per step.
    return {"bytes_through_each_rank": min(2, ranks - 1) * value + value * ring,
            "messages": (ranks - 1) + 2 * (ranks - 1)}  # fmt: skip


def rank_main(checkpoint: str, tokens: int, mode: str) -> None:
    """On every rank: load, one warm-up, one timed generation; rank 0 prints the figures."""
    loaded = load_moe(checkpoint, streaming=False, dtype="float32", parallel=mode)
    engine = TargetEngine(loaded.model, None, loaded.cache.new)
    engine.generate(PROMPT, SamplingParams(max_tokens=4))
    result = engine.generate(PROMPT, SamplingParams(max_tokens=tokens))
    stats = result.stats
    config = loaded.checkpoint.config
    hidden, top_k = int(config["hidden_size"]), int(config["num_experts_per_tok"])
    layers = len(loaded.plan.switches)
    ranks = 1 if loaded.shard is None else loaded.shard.size
    if loaded.shard is None or loaded.shard.rank == 0:
        print(json.dumps({
            "ranks": ranks, "decode_tps": (stats.generation_tokens - 1) / stats.generation_seconds,
            "prefill_tps": stats.prompt_tps, "tokens": result.tokens,
            **exchanges(mode, ranks, layers, top_k, hidden),
        }), flush=True)  # fmt: skip


def launch(layout: str, checkpoint: str, tokens: int) -> dict[str, float]:
    ranks, _, mode = layout.partition(":")
    me = [sys.executable, __file__, "--rank-main", checkpoint, str(tokens), mode or "expert"]
    command = me if ranks == "1" else [str(Path(sys.executable).with_name("mlx.launch")), "-n",
                                     ranks, "--backend", "ring", *me]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
    if line is None:
        raise SystemExit(f"{layout} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(line)  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(default_model_path()))
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["1", "2:expert", "2:pipeline", "4:expert", "4:pipeline"],
        help="RANKS or RANKS:expert or RANKS:pipeline; the first is the base",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layouts = args.layouts
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in layouts}
    for r in range(args.rounds):
        order = layouts[r % len(layouts) :] + layouts[: r % len(layouts)]
        for n in order:
            start = time.perf_counter()
            runs[n].append(launch(n, args.checkpoint, args.tokens))
            print(f"round {r + 1}  {n}  decode {runs[n][-1]['decode_tps']:.1f} tok/s  "
                  f"({time.perf_counter() - start:.0f} s with load)", file=sys.stderr)  # fmt: skip
    base = runs[layouts[0]]
    print(f"{Path(args.checkpoint).name}  device={mx.default_device()}  rounds={args.rounds}  "
          f"decode {args.tokens} tokens, ring backend on loopback")  # fmt: skip
    print(
        f"| ranks:layout | decode tok/s | prefill tok/s | vs {layouts[0]} (per round) | "
        "messages in sequence / token | bytes through each rank / token | same tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, rs in runs.items():

        def spread(key: str, fmt: str = "{:.1f}", rs: list[dict[str, float]] = rs) -> str:
            values = [float(x[key]) for x in rs]
            return (f"{fmt.format(statistics.median(values))} "
                    f"({fmt.format(min(values))}-{fmt.format(max(values))})")  # fmt: skip

        ratio = [a["decode_tps"] / b["decode_tps"] for a, b in zip(rs, base, strict=True)]
        ratios = f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
        same = all(a["tokens"] == b["tokens"] for a, b in zip(rs, base, strict=True))
        print(
            f"| {n} | {spread('decode_tps')} | {spread('prefill_tps')} | {ratios} | "
            f"{int(rs[0]['messages']):,} | "
            f"{int(rs[0]['bytes_through_each_rank']):,} | {same} |"
        )


if __name__ == "__main__":
    main()
