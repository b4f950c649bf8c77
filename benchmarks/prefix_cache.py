"""Time to first token over a multi-turn agent trace: cold, L1 hits, and L2 hits after a restart.

A seeded random qwen3_moe (the ``small`` preset of ``decode_vs_mlxlm.py`` unless told otherwise)
gets a ten-turn conversation: a system prompt listing tool schemas, then user messages and
fixed assistant tool calls, so turn ``t + 1`` starts with all of turn ``t``. Three runs of the
same trace, each turn generating 16 greedy tokens:

- cold: no prefix cache, the whole prompt is prefilled every turn;
- L1: a fresh ``PrefixCache`` over an empty directory; each turn reuses the previous turn's
  snapshot from memory (turn 1 has nothing to reuse);
- L2 after a restart: a new process opens the same directory with an empty memory tier; each
  turn's snapshot comes from disk.

    uv run python benchmarks/prefix_cache.py
    uv run python benchmarks/prefix_cache.py --preset medium --turns 6

With mlx-lm installed (``uv run --group bench``), the trace also goes through ``mlx_lm.server``
over HTTP, whose in-memory prompt cache is the peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from mach import load_moe
from mach.cache.prefix import PrefixCache
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model import write_random_qwen3_moe

sys.path.insert(0, str(Path(__file__).parent))
from decode_vs_mlxlm import PRESETS

TOOLS = [
    {"name": name, "description": f"{name.replace('_', ' ')} in the workspace",
     "parameters": {"type": "object", "properties": {
         "path": {"type": "string", "description": "file or folder, relative to the root"},
         "pattern": {"type": "string", "description": "a regular expression"},
         "limit": {"type": "integer", "description": "the most results to return"}},
         "required": ["path"]}}
    for name in ("read_file", "write_file", "list_folder", "search_text", "run_tests",
                 "apply_patch")
]  # fmt: skip


def trace(turns: int) -> list[list[dict[str, str]]]:
    """The message list of every turn: each one extends the previous turn's."""
    system = "You are a coding agent. Call tools as JSON. Tools:\n" + json.dumps(TOOLS)
    messages = [{"role": "system", "content": system}]
    out = []
    for t in range(turns):
        ask = (f"Step {t + 1}: look at module_{t}.py, find where the parser handles case {t}, "
               "and tell me what to change.")  # fmt: skip
        messages.append({"role": "user", "content": ask})
        out.append(list(messages))
        call = {"name": "search_text", "arguments": {"path": f"src/module_{t}.py",
                "pattern": f"case_{t}", "limit": 20}}  # fmt: skip
        messages.append({"role": "assistant", "content": json.dumps(call) + " " + "ok " * 20})
    return out


def run_trace(path: Path, cache_dir: Path | None, turns: int) -> list[dict[str, Any]]:
    loaded = load_moe(path)
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    prefix = PrefixCache.for_model(loaded, directory=cache_dir) if cache_dir else None
    engine = TargetEngine(loaded.model, tokenizer, loaded.cache.new, prefix_cache=prefix)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    warm = tokenizer.encode("warm up the kernels " * 20)
    TargetEngine(loaded.model, tokenizer, loaded.cache.new).generate(warm, params)
    rows = []
    for messages in trace(turns):
        tokens = tokenizer.encode(tokenizer.apply_chat_template(messages),
                                  add_special_tokens=False)  # fmt: skip
        mx.clear_cache()
        result = engine.generate(tokens, params)
        rows.append({"prompt": len(tokens), "ttft": result.stats.time_to_first_token,
                     "cached": result.stats.cached_tokens, "tokens": result.tokens})  # fmt: skip
    return rows


def mlx_lm_server_trace(path: Path, turns: int) -> list[float] | None:
    """TTFT per turn through ``mlx_lm.server`` (streamed chat completions), if installed."""
    try:
        import httpx
        import mlx_lm  # noqa: F401
    except ImportError:
        return None
    port = 18517
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(path),
                               "--port", str(port)], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        times = []
        for messages in trace(turns):
            body = {"messages": messages, "max_tokens": 16, "temperature": 0.0, "stream": True}
            start = time.perf_counter()
            with httpx.stream("POST", url, json=body, timeout=600) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: ") and '"content"' in line:
                        times.append(time.perf_counter() - start)
                        break
                for _ in lines:
                    pass
        return times
    finally:
        server.terminate()
        server.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument(
        "--l2-only", nargs=2, metavar=("MODEL", "CACHE_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.l2_only:
        rows = run_trace(Path(args.l2_only[0]), Path(args.l2_only[1]), args.turns)
        print(json.dumps(rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_qwen3_moe(Path(tmp) / "model", PRESETS[args.preset])
        cache_dir = Path(tmp) / "prompt-cache"
        cold = run_trace(path, None, args.turns)
        l1 = run_trace(path, cache_dir, args.turns)
        restarted = subprocess.run(
            [sys.executable, __file__, "--turns", str(args.turns), "--l2-only", str(path),
             str(cache_dir)], capture_output=True, text=True, check=True)  # fmt: skip
        l2 = json.loads(restarted.stdout.strip().splitlines()[-1])
        peer = mlx_lm_server_trace(path, args.turns)
        disk = sum(f.stat().st_size for f in cache_dir.glob("*.safetensors"))
    same = all(
        c["tokens"] == a["tokens"] == b["tokens"] for c, a, b in zip(cold, l1, l2, strict=True)
    )
    print(f"preset={args.preset}  device={mx.default_device()}  same tokens in every run: {same}")
    print(f"disk tier after the trace: {disk / 1e6:.1f} MB")
    head = (
        "| turn | prompt tokens | cold TTFT | L1 TTFT (reused) | L2 TTFT after restart (reused) |"
    )
    print(head + (" mlx_lm.server TTFT |" if peer else ""))
    print("|---" * (5 + bool(peer)) + "|")
    for t, (c, a, b) in enumerate(zip(cold, l1, l2, strict=True)):
        cells = [str(t + 1), str(c["prompt"]), f"{c['ttft']:.3f} s"]
        cells += [f"{r['ttft']:.3f} s ({r['cached']})" for r in (a, b)]
        if peer:
            cells.append(f"{peer[t]:.3f} s")
        print("| " + " | ".join(cells) + " |")
    later = slice(1, None)
    print(f"turns 2-{args.turns}, median (range): cold {spread([r['ttft'] for r in cold][later])}"
          f", L1 {spread([r['ttft'] for r in l1][later])}"
          f", L2 {spread([r['ttft'] for r in l2][later])}"
          + (f", mlx_lm.server {spread(peer[later])}" if peer else ""))  # fmt: skip
    last = args.turns - 1
    print(
        f"turn {args.turns}: cold / L1 = {cold[last]['ttft'] / l1[last]['ttft']:.1f}x, "
        f"cold / L2 = {cold[last]['ttft'] / l2[last]['ttft']:.1f}x"
    )
    if peer is None:
        print("mlx_lm.server: not run (mlx-lm is not installed; use uv run --group bench)")


if __name__ == "__main__":
    main()
