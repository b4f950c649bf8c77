"""DFlash speculative decoding against target-only decoding on the default model.

The embedded default model and the DFlash draft shipped beside it decode code prompts greedily,
target-only, with the draft, and through mlx-lm (the peer, target-only; with mlx-lm installed:
``uv run --group bench``), alternating round by round (who goes first rotates). Printed:
decode tokens/s of each (prefill excluded), the per-round ratio as median and range, tokens per
verify pass and the share of drafts accepted, whether the tokens are identical, and, with
experts streamed at half their bytes, the expert bytes read per generated token with and
without the draft.

    uv run --group bench python benchmarks/dflash.py
    uv run --group bench python benchmarks/dflash.py --rounds 7 --tokens 128
"""

from __future__ import annotations

import mach  # first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.decode.speculative import SpecDecEngine
from mach.default_model import default_model_path

sys.path.insert(0, str(Path(__file__).parent))
from harness import timed

PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef ",
    "class Stack:\n    ",
    'def read_config(path):\n    """Read a JSON config file."""\n',
    "    for key, value in sorted(items.items()):\n",
    "class Timer:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "    try:\n        import numpy as np\n    except ImportError:\n",
]


def run(engine: Any, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    tokens, seconds, outputs = 0, 0.0, []
    passes = accepted = drafted = target_passes = generated = 0
    for prompt in prompts:
        result = engine.generate(prompt, params)
        stats = result.stats
        tokens += stats.generation_tokens - 1  # the first token comes from the prefill
        seconds += stats.generation_seconds
        passes += stats.verify_passes
        target_passes += stats.target_passes
        generated += stats.generation_tokens
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
        outputs.append(result.tokens)
    return {"tps": tokens / seconds, "outputs": outputs, "passes": passes,
            "accepted": accepted, "drafted": drafted, "target_passes": target_passes,
            "generated": generated}  # fmt: skip


class PeerEngine:
    """mlx-lm's own greedy decoding of the same checkpoint, timed like mach's."""

    def __init__(self) -> None:
        from mlx_lm import load

        self.model, _ = load(str(default_model_path()))
        if mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm takes float32 only; mach widens bfloat16 experts per call.
            self.model.set_dtype(mx.float32)

    def generate(self, prompt: list[int], params: SamplingParams) -> Any:
        from types import SimpleNamespace

        from mlx_lm.generate import generate_step

        steps = generate_step(mx.array(prompt), self.model, max_tokens=params.max_tokens)
        got = timed((int(t) for t, _ in steps), len(prompt))
        ids = got.tokens
        # Timed from the first token, as mach's stats are.
        stats = SimpleNamespace(generation_tokens=len(ids), generation_seconds=got.decode_s,
                                verify_passes=0, accepted_tokens=0, draft_tokens=0,
                                target_passes=len(ids))  # fmt: skip
        return SimpleNamespace(tokens=ids, stats=stats)


def _has_peer() -> bool:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


def streamed_bytes(
    prompts: list[list[int]],
    params: SamplingParams,
    draft: bool,
    draft_path: str | None,
    draft_tokens: int | None = None,
) -> float:
    """Expert bytes read per generated token with experts streamed at half their bytes."""
    loaded = load_moe(default_model_path(), streaming=True, expert_budget=_half_budget(),
                      draft_path=draft_path)  # fmt: skip
    engine = build_engine(loaded, draft=draft, num_draft_tokens=draft_tokens if draft else None)
    engine.generate(prompts[0], params)  # warm the bank
    before = loaded.store.stats()["bytes_read"]
    generated = 0
    for prompt in prompts:
        generated += engine.generate(prompt, params).stats.generation_tokens
    return (loaded.store.stats()["bytes_read"] - before) / generated


def _half_budget() -> int:
    loaded = load_moe(default_model_path(), streaming=False)
    return max(1, loaded.experts.expert_bytes // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--draft-path", help="a DFlash draft folder instead of the shipped one")
    parser.add_argument("--draft-tokens", type=int, help="drafts per pass (default: block - 1)")
    parser.add_argument("--no-compile", action="store_true", help="build every pass op by op")
    args = parser.parse_args()
    loaded = load_moe(default_model_path(), draft_path=args.draft_path,
                      compile=not args.no_compile)  # fmt: skip
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    target = TargetEngine(loaded.model, tokenizer, loaded.cache.new, passes=loaded.passes)
    dflash = build_engine(loaded, num_draft_tokens=args.draft_tokens)
    if not isinstance(dflash, SpecDecEngine):
        raise SystemExit("the default model has no DFlash draft beside it")
    engines: dict[str, Any] = {"target-only": target, "dflash": dflash}
    if _has_peer():
        engines["mlx-lm"] = PeerEngine()
    for engine in engines.values():  # warm-up
        engine.generate(prompts[0], SamplingParams(max_tokens=8))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            mx.clear_cache()
            rows[name].append(run(engines[name], prompts, params))
    same = all(a["outputs"] == b["outputs"]
               for a, b in zip(rows["target-only"], rows["dflash"], strict=True))  # fmt: skip
    ratios = [d["tps"] / t["tps"] for t, d in zip(rows["target-only"], rows["dflash"],
                                                  strict=True)]  # fmt: skip
    d = rows["dflash"]
    passes, accepted = sum(x["passes"] for x in d), sum(x["accepted"] for x in d)
    drafted = sum(x["drafted"] for x in d)
    print(f"device={mx.default_device()}  BLAS={mach._blas.loaded or 'bundled'}  "
          f"draft block={dflash.k + 1}  compiled={loaded.passes is not None}  "
          f"prompts={len(prompts)}  tokens={args.tokens}  "
          f"rounds={args.rounds}  identical tokens: {same}")  # fmt: skip
    for name in names:
        tps = [x["tps"] for x in rows[name]]
        print(f"{name}: decode {statistics.median(tps):.1f} tok/s "
              f"(range {min(tps):.1f}-{max(tps):.1f})")  # fmt: skip
    print(f"dflash / target-only decode: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if "mlx-lm" in rows:
        for name in ("target-only", "dflash"):
            peer = [x["tps"] / p["tps"] for x, p in zip(rows[name], rows["mlx-lm"], strict=True)]
            print(f"{name} / mlx-lm decode: median {statistics.median(peer):.2f}x "
                  f"(range {min(peer):.2f}-{max(peer):.2f})")  # fmt: skip
    else:
        print("mlx-lm: not run (not installed; use uv run --group bench)")
    every = sum(x["generated"] for x in d) / sum(x["target_passes"] for x in d)
    print(f"tokens per target pass {every:.2f} (the prompt's pass and plain steps included), "
          f"per verify pass {(accepted + passes) / passes:.2f}, drafts accepted "
          f"{accepted / max(drafted, 1):.0%}")  # fmt: skip
    few = prompts[:4]
    plain = streamed_bytes(few, params, False, args.draft_path)
    drafted_bytes = streamed_bytes(few, params, True, args.draft_path, args.draft_tokens)
    print(f"streaming at half the expert bytes: {plain / 1e6:.2f} MB of experts read per token "
          f"target-only, {drafted_bytes / 1e6:.2f} MB with the draft")  # fmt: skip


if __name__ == "__main__":
    main()
