"""Decode and prefill speed of mach against mlx-lm on the same synthesized qwen3_moe checkpoint.

Both engines run in this process, on the same checkpoint, greedy, with no detokenization,
alternating round by round (``harness.alternate``); the script prints each engine's prefill and
decode tokens/s (median and range over rounds), the median and range of mach's per-round ratio
to mlx-lm, and how many greedy tokens the two share.

    uv run --group bench python benchmarks/decode_vs_mlxlm.py --preset medium --bits 4

Presets size the model so a run takes seconds (small) to about a minute (large) on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import numpy as np

from mach.default_model import write_large_random_qwen3_moe, write_random_qwen3_moe

sys.path.insert(0, str(Path(__file__).parent))
from harness import alternate, report
from peer import mach_engine, mlx_lm_engine

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
    # Qwen3-30B-A3B's shape (17 GB at 4 bits), written a layer at a time: for a GPU.
    "30b": {"hidden_size": 2048, "num_hidden_layers": 48, "num_experts": 128,
            "num_experts_per_tok": 8, "moe_intermediate_size": 768, "head_dim": 128,
            "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 151936},
}  # fmt: skip
LARGE = {"30b"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--float", action="store_true", help="float32 experts, not quantized")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="mach builds steps op by op")
    parser.add_argument("--both", action="store_true",
                        help="run mach compiled and uncompiled beside mlx-lm")  # fmt: skip
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        if args.preset in LARGE:
            write_large_random_qwen3_moe(path, PRESETS[args.preset], args.bits)
        else:
            write_random_qwen3_moe(path, PRESETS[args.preset], None if args.float else args.bits)
        config = json.loads((path / "config.json").read_text())
        prompt = np.random.default_rng(0).integers(0, config["vocab_size"], args.prompt_tokens)
        ids = prompt.tolist()
        engines = [("mlx-lm", mlx_lm_engine(path, ids, args.tokens, prefill_step_size=2048))]
        if args.both or args.no_compile:
            engines.append(("mach uncompiled", mach_engine(path, ids, args.tokens,
                                                            prefill_step_size=2048,
                                                            compile=False)))  # fmt: skip
        if not args.no_compile:
            engines.append(("mach", mach_engine(path, ids, args.tokens, prefill_step_size=2048)))
        results = alternate(engines, args.rounds)
    experts = "float32" if args.float else f"affine{args.bits}"
    report(results, "mlx-lm", f"preset={args.preset}  experts={experts}  "
           f"prompt={args.prompt_tokens}  decode={args.tokens}")  # fmt: skip


if __name__ == "__main__":
    main()
