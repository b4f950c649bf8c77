"""Decode and prefill speed of mach against mlx-lm on the same synthesized qwen3_moe checkpoint.

Both engines run in this process, on the same checkpoint, greedy, with no detokenization, and the
script prints each engine's numbers and mach's ratio to mlx-lm. It also reports whether the two
produced the same tokens.

    uv run --group bench python benchmarks/decode_vs_mlxlm.py --preset medium --bits 4

Presets size the model so a run takes seconds (small) to about a minute (large) on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import write_random_qwen3_moe

PRESETS: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_experts": 16,
              "num_experts_per_tok": 4, "moe_intermediate_size": 128, "head_dim": 64,
              "vocab_size": 4096},
    "medium": {"hidden_size": 512, "num_hidden_layers": 8, "num_experts": 32,
               "num_experts_per_tok": 4, "moe_intermediate_size": 256, "head_dim": 64,
               "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8192},
    "large": {"hidden_size": 1024, "num_hidden_layers": 12, "num_experts": 64,
              "num_experts_per_tok": 8, "moe_intermediate_size": 512, "head_dim": 64,
              "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 16384},
}  # fmt: skip


def timed(stream: Iterator[int], prompt_len: int) -> dict[str, Any]:
    start = time.perf_counter()
    tokens, first = [], 0.0
    for token in stream:
        if not tokens:
            first = time.perf_counter()
        tokens.append(token)
    end = time.perf_counter()
    return {
        "prompt_tps": prompt_len / (first - start),
        "decode_tps": (len(tokens) - 1) / (end - first),
        "tokens": tokens,
    }


def run_mach(path: Path, prompt: list[int], n: int) -> Callable[[], dict[str, Any]]:
    model, _, _, cache = load_moe(path)
    engine = TargetEngine(model, None, cache.new, prefill_step_size=2048)
    params = SamplingParams(max_tokens=n)

    def once() -> dict[str, Any]:
        events = (e.token for e in engine.stream(prompt, params) if e.token is not None)
        return timed(events, len(prompt))

    return once


def run_mlx_lm(path: Path, prompt: list[int], n: int) -> Callable[[], dict[str, Any]]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))

    def once() -> dict[str, Any]:
        steps = generate_step(mx.array(prompt), model, max_tokens=n, prefill_step_size=2048)
        return timed((int(t) for t, _ in steps), len(prompt))

    return once


def best_of(run: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    run()  # warm-up: kernels, allocator
    results = [run() for _ in range(repeats)]
    return {
        "prompt_tps": max(r["prompt_tps"] for r in results),
        "decode_tps": max(r["decode_tps"] for r in results),
        "tokens": results[0]["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--float", action="store_true", help="float32 experts, not quantized")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        write_random_qwen3_moe(path, PRESETS[args.preset], None if args.float else args.bits)
        config = json.loads((path / "config.json").read_text())
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, config["vocab_size"], args.prompt_tokens).tolist()
        mach = best_of(run_mach(path, prompt, args.tokens), args.repeats)
        peer = best_of(run_mlx_lm(path, prompt, args.tokens), args.repeats)

    agree = 0
    for a, b in zip(mach["tokens"], peer["tokens"], strict=False):
        if a != b:
            break
        agree += 1
    report = {
        "device": str(mx.default_device()),
        "preset": args.preset,
        "experts": "float32" if args.float else f"affine{args.bits}",
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.tokens,
        "mach": {k: round(v, 1) for k, v in mach.items() if k != "tokens"},
        "mlx_lm": {k: round(v, 1) for k, v in peer.items() if k != "tokens"},
        "ratio_prompt": round(mach["prompt_tps"] / peer["prompt_tps"], 3),
        "ratio_decode": round(mach["decode_tps"] / peer["decode_tps"], 3),
        "same_tokens": f"{agree}/{args.tokens}",
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{report['device']}  preset={args.preset}  experts={report['experts']}  "
        f"prompt={args.prompt_tokens}  decode={args.tokens}"
    )
    for name in ("mach", "mlx_lm"):
        r = report[name]
        prefill, decode = r["prompt_tps"], r["decode_tps"]
        print(f"  {name:7s} prefill {prefill:9.1f} tok/s   decode {decode:8.1f} tok/s")
    print(
        f"  mach / mlx-lm: prefill x{report['ratio_prompt']}  decode x{report['ratio_decode']}  "
        f"same greedy tokens: {report['same_tokens']}"
    )


if __name__ == "__main__":
    main()
