"""DFlash decoding with and without key buckets for short query blocks (a GPU effect).

On a GPU, MLX builds a cuDNN attention graph per shape of a multi-query call; without buckets
the key count of every verify pass and draft block is new, so each pass builds one.
``mach.layers.attention.keys_in_buckets`` decides; this script forces it each way, alternating
round by round, and prints decode tokens/s of target-only and drafted decoding (the engine
drafts on every pass here, so the draft's cost is not hidden by plain passes).

    uv run python benchmarks/attention_buckets.py --rounds 2
"""

from __future__ import annotations

import mach  # first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import argparse
import statistics
import sys
from pathlib import Path

import mlx.core as mx

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.default_model import default_model_path
from mach.layers import attention

sys.path.insert(0, str(Path(__file__).parent))
from dflash import PROMPTS, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-path", help="a DFlash draft folder instead of the shipped one")
    args = parser.parse_args()
    # Compiled passes mask inside their own graph; the buckets are the uncompiled path's.
    loaded = load_moe(default_model_path(), draft_path=args.draft_path, compile=False)
    assert loaded.tokenizer is not None
    prompts = [loaded.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    target = TargetEngine(loaded.model, loaded.tokenizer, loaded.cache.new, passes=loaded.passes)
    drafted = build_engine(loaded)
    drafted.measure = False  # type: ignore[attr-defined]
    rates: dict[bool, dict[str, list[float]]] = {b: {"target": [], "dflash": []} for b in (0, 1)}
    for r in range(args.rounds):
        for bucketed in (r % 2 == 0, r % 2 == 1):
            attention.keys_in_buckets = lambda b=bucketed: b  # type: ignore[misc]
            run(drafted, prompts[:1], params)  # builds this setting's shapes once
            rates[bucketed]["target"].append(run(target, prompts, params)["tps"])
            rates[bucketed]["dflash"].append(run(drafted, prompts, params)["tps"])
    print(f"device={mx.default_device()}  prompts={len(prompts)}  tokens={args.tokens}  "
          f"rounds={args.rounds}  BLAS={mach._blas.loaded or 'bundled'}")  # fmt: skip
    for bucketed in (False, True):
        got = rates[bucketed]
        ratio = [d / t for d, t in zip(got["dflash"], got["target"], strict=True)]
        spread = f"{statistics.median(ratio):.2f}x (range {min(ratio):.2f}-{max(ratio):.2f})"
        print(f"buckets {'on ' if bucketed else 'off'}: target-only "
              f"{statistics.median(got['target']):.1f} tok/s, dflash "
              f"{statistics.median(got['dflash']):.1f} tok/s, ratio median {spread}")  # fmt: skip


if __name__ == "__main__":
    main()
