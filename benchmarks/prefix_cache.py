"""Time to first token over a multi-turn agent trace: cold, L1 hits, and L2 hits after a restart.

A seeded random qwen3_moe (the ``small`` preset of ``decode_vs_mlxlm.py`` unless told otherwise)
gets a ten-turn conversation: a system prompt listing tool schemas, then user messages and
fixed assistant tool calls, so turn ``t + 1`` starts with all of turn ``t``. The same trace
runs through each engine below, each turn generating 16 greedy tokens; cold, L1 and the peer
alternate turn by turn (who goes first rotates), and the ratios print as median and range:

- cold: no prefix cache, the whole prompt is prefilled every turn;
- L1: a fresh ``PrefixCache`` over an empty directory; each turn reuses the previous turn's
  snapshot from memory (turn 1 has nothing to reuse);
- L2 after a restart: a new process opens the same directory with an empty memory tier; each
  turn's snapshot comes from disk.

    uv run python benchmarks/prefix_cache.py
    uv run python benchmarks/prefix_cache.py --preset medium --turns 6

- mlx_lm.server, with mlx-lm installed (``uv run --group bench``): the trace over HTTP; its
  in-memory prompt cache is the peer of L1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mach  # first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
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


class MachTurns:
    """One mach engine over the trace, a turn at a time (``cache_dir=None``: no prefix cache)."""

    def __init__(self, path: Path, cache_dir: Path | None) -> None:
        loaded = load_moe(path)
        tokenizer = loaded.tokenizer
        assert tokenizer is not None
        self.tokenizer = tokenizer
        prefix = PrefixCache.for_model(loaded, directory=cache_dir) if cache_dir else None
        self.engine = TargetEngine(loaded.model, tokenizer, loaded.cache.new, prefix_cache=prefix)
        self.params = SamplingParams(max_tokens=16, temperature=0.0)
        warm = tokenizer.encode("warm up the kernels " * 20)
        TargetEngine(loaded.model, tokenizer, loaded.cache.new).generate(warm, self.params)

    def turn(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        tokens = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages),
                                       add_special_tokens=False)  # fmt: skip
        mx.clear_cache()
        result = self.engine.generate(tokens, self.params)
        return {"prompt": len(tokens), "ttft": result.stats.time_to_first_token,
                "cached": result.stats.cached_tokens, "tokens": result.tokens}  # fmt: skip


def run_trace(path: Path, cache_dir: Path | None, turns: int) -> list[dict[str, Any]]:
    runner = MachTurns(path, cache_dir)
    return [runner.turn(messages) for messages in trace(turns)]


class PeerTurns:
    """The trace through ``mlx_lm.server`` over HTTP (streamed chat completions)."""

    def __init__(self, path: Path, port: int = 18517) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        # The peer gets the BLAS mach loaded, so the comparison is of engines, not libraries.
        env = dict(os.environ)
        if mach._blas.loaded:
            env["LD_PRELOAD"] = mach._blas.loaded
        self.server = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model",
                                        str(path), "--port", str(port)],
                                       stderr=subprocess.DEVNULL, env=env)  # fmt: skip
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("mlx_lm.server did not start")

    def turn(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        import httpx

        body = {"messages": messages, "max_tokens": 16, "temperature": 0.0, "stream": True}
        start = time.perf_counter()
        ttft = float("nan")
        with httpx.stream("POST", self.url, json=body, timeout=600) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    ttft = time.perf_counter() - start
                    break
            for _ in lines:
                pass
        return {"ttft": ttft}

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


def has_peer() -> bool:
    try:
        import httpx  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


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
        runners: dict[str, Any] = {"cold": MachTurns(path, None), "L1": MachTurns(path, cache_dir)}
        peer_runner = PeerTurns(path) if has_peer() else None
        if peer_runner is not None:
            runners["mlx_lm.server"] = peer_runner
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
        names = list(runners)
        try:
            # Turn by turn, the engines take turns going first, so a slow patch of the shared
            # machine does not land on one engine only.
            for t, messages in enumerate(trace(args.turns)):
                for name in names[t % len(names) :] + names[: t % len(names)]:
                    rows[name].append(runners[name].turn(messages))
        finally:
            if peer_runner is not None:
                peer_runner.close()
        restarted = subprocess.run(
            [sys.executable, __file__, "--turns", str(args.turns), "--l2-only", str(path),
             str(cache_dir)], capture_output=True, text=True, check=True)  # fmt: skip
        rows["L2"] = json.loads(restarted.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in cache_dir.glob("*.safetensors"))
    cold, l1, l2 = rows["cold"], rows["L1"], rows["L2"]
    peer = [r["ttft"] for r in rows["mlx_lm.server"]] if peer_runner is not None else None
    same = all(
        c["tokens"] == a["tokens"] == b["tokens"] for c, a, b in zip(cold, l1, l2, strict=True)
    )
    blas = mach._blas.loaded or "bundled"
    print(f"preset={args.preset}  device={mx.default_device()}  BLAS={blas}  same tokens in every "
          f"run: {same}")  # fmt: skip
    print(f"disk tier after the trace: {disk / 1e6:.1f} MB")
    head = (
        "| turn | prompt tokens | cold TTFT | L1 TTFT (reused) | L2 TTFT after restart (reused) |"
    )
    print(head + (" mlx_lm.server TTFT | mlx_lm.server / L1 |" if peer else ""))
    print("|---" * (5 + 2 * bool(peer)) + "|")
    for t, (c, a, b) in enumerate(zip(cold, l1, l2, strict=True)):
        cells = [str(t + 1), str(c["prompt"]), f"{c['ttft']:.3f} s"]
        cells += [f"{r['ttft']:.3f} s ({r['cached']})" for r in (a, b)]
        if peer:
            cells += [f"{peer[t]:.3f} s", f"{peer[t] / a['ttft']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    later = slice(1, None)
    print(f"turns 2-{args.turns}, median (range): cold {spread([r['ttft'] for r in cold][later])}"
          f", L1 {spread([r['ttft'] for r in l1][later])}"
          f", L2 {spread([r['ttft'] for r in l2][later])}"
          + (f", mlx_lm.server {spread(peer[later])}" if peer else ""))  # fmt: skip
    ratios = {
        "cold / L1": [c["ttft"] / a["ttft"] for c, a in zip(cold, l1, strict=True)],
        "cold / L2": [c["ttft"] / b["ttft"] for c, b in zip(cold, l2, strict=True)],
    }
    if peer:
        ratios["mlx_lm.server / L1"] = [p / a["ttft"] for p, a in zip(peer, l1, strict=True)]
    for name, values in ratios.items():
        part = values[later]
        print(
            f"ratio {name}, turns 2-{args.turns}: median {statistics.median(part):.2f}x "
            f"(range {min(part):.2f}-{max(part):.2f}); turn {args.turns}: {values[-1]:.2f}x"
        )
    if not peer:
        print("mlx_lm.server: not run (mlx-lm is not installed; use uv run --group bench)")


if __name__ == "__main__":
    main()
