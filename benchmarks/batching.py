"""Continuous batching over HTTP: `mach serve` against `mlx_lm.server` on the same checkpoint.

Writes a seeded random qwen3_moe (4-bit, a preset of ``decode_vs_mlxlm.py`` with the byte-level
tokenizer's vocabulary, so every streamed token carries text), starts `mach serve`
with every expert resident, `mach serve --streaming` with an expert budget of each
``--budget-fraction`` of the expert bytes, and `mlx_lm.server` (with mlx-lm installed: ``uv run
--group bench``), then drives each with the same load: at concurrency C, C clients each send
``--requests`` streamed greedy completions back to back, every prompt distinct (so no prompt
cache helps) and the same for every engine. Per engine and C it measures total generated tokens
per second (all tokens over the round's wall time), time to first token and inter-token latency
(p50 and p99 over every request and token gap), and, for streaming, the expert bytes read per
generated token (from the server's ``/metrics``). Rounds alternate the engines (who goes first
rotates), so a slow patch of the shared machine does not land on one engine only; the summary
gives medians with their range over rounds, and median (range) of the per-round ratios.

    uv run --group bench python benchmarks/batching.py
    uv run --group bench python benchmarks/batching.py --preset medium --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes.util
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import mach  # noqa: F401 - gives MLX the system BLAS before anything imports it
from mach.check import check_checkpoint
from mach.default_model import default_model_path, write_random_qwen3_moe

sys.path.insert(0, str(Path(__file__).parent))
import itertools

from decode_vs_mlxlm import PRESETS

BYTE_VOCAB = 259
"""The random models' byte-level tokenizer: 256 bytes and three special tokens."""
WORDS = ["the", "parser", "reads", "each", "token", "and", "the", "cache", "keeps", "every",
         "block", "it", "has", "seen"]  # fmt: skip


@dataclass
class Round:
    """One engine at one concurrency in one round."""

    tps: float
    ttft: list[float]
    gaps: list[float]
    tokens: int
    bytes_per_token: float | None = None
    distinct: float | None = None
    """Distinct experts a decode layer call looked up, on average."""
    floor_per_token: float | None = None
    """Bytes per token any policy must read: a call needing more experts than the bank's slots
    reads the rest whatever the bank kept (from the average call, so a lower bound)."""
    failed: int = 0
    """Requests that ended in an HTTP error."""


@dataclass
class Engine:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    expert_bytes: float = 0.0
    """Bytes of one expert of one layer."""
    rounds: dict[int, list[Round]] = field(default_factory=dict)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, args: list[str], port: int) -> Engine:
    env = dict(os.environ)
    blas = ctypes.util.find_library("openblas")
    if blas:  # both engines run with the same BLAS
        env["LD_PRELOAD"] = blas
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(f"{url}/v1/models", timeout=1)
            return Engine(name, url, process)
        except httpx.HTTPError:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited at start ({process.returncode})") from None
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{name} did not start")


NAMES = ["parse", "read", "write", "open", "close", "format", "check", "build", "load", "split",
         "join", "merge", "encode", "decode", "find", "update"]  # fmt: skip
THINGS = ["header", "path", "buffer", "record", "token", "line", "value", "entry", "block", "name",
          "field", "item"]  # fmt: skip


def prompt(rng: random.Random, words: int, code: bool = False) -> str:
    """Words for the random models; for a trained checkpoint (the default model writes Python),
    the start of a Python function, so its routing is the routing of real use."""
    if code:
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        args = ", ".join(rng.sample(THINGS, 2))
        return (
            f"def {name}_{thing}_{rng.randrange(1000)}(self, {args}):\n"
            f'    """{name.capitalize()} the {thing} from {args.split(", ")[0]}."""\n    '
        )
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" {rng.randrange(10**9)}"


async def one(client: httpx.AsyncClient, text: str, tokens: int) -> tuple[float, list[float], int]:
    """One streamed completion: time to first token, the gaps between tokens, tokens made."""
    body = {"prompt": text, "max_tokens": tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, stamps, used = time.perf_counter(), [], 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:  # counted, and the load goes on
        print(f"request failed: {exc!r}", file=sys.stderr)
        return float("nan"), [], -1
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return (stamps[0] - start if stamps else float("nan")), gaps, used


async def load(engine: Engine, concurrency: int, requests: int, tokens: int, words: int,
               seed: int, code: bool = False) -> Round:  # fmt: skip
    """``concurrency`` clients, each sending ``requests`` completions back to back."""

    async def client_loop(index: int) -> list[tuple[float, list[float], int]]:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=engine.url, timeout=600) as client:
            return [await one(client, prompt(rng, words, code), tokens) for _ in range(requests)]

    before = expert_reads(engine)
    start = time.perf_counter()
    results = await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    total = sum(max(0, r[2]) for r in flat)
    after = expert_reads(engine)
    out = Round(total / wall, [r[0] for r in flat], [g for r in flat for g in r[1]], total,
                failed=sum(r[2] < 0 for r in flat))  # fmt: skip
    if before is not None and after is not None and after["tokens"] > before["tokens"]:
        delta = {k: after[k] - before[k] for k in after}
        out.bytes_per_token = delta["bytes"] / delta["tokens"]
        if delta["calls"] and after["slots"]:  # a shared pool has no per-layer slots
            out.distinct = delta["lookups"] / delta["calls"]
            short = max(0.0, out.distinct - after["slots"]) * delta["calls"]
            out.floor_per_token = short * engine.expert_bytes / delta["tokens"]
    return out


def expert_reads(engine: Engine) -> dict[str, float] | None:
    """Decode bytes read, tokens, layer calls, experts looked up and slots per layer, for mach
    streaming (from the server's ``/metrics``)."""
    if not engine.name.startswith("mach"):
        return None
    text = httpx.get(f"{engine.url}/metrics", timeout=10).text

    def total(name: str, labels: str = "[^}]*") -> int:
        return sum(int(v) for v in re.findall(rf"^{name}\{{{labels}\}} (\d+)", text, re.M))

    slots = re.search(r"^mach_expert_slots_per_layer (\d+)", text, re.M)
    decode = 'phase="decode"'
    return {"bytes": total("mach_expert_decode_bytes_read_total"),
            "tokens": total("mach_decode_tokens_total"),
            "calls": total("mach_expert_layer_calls_total", decode),
            "lookups": total("mach_expert_hits_total", decode)
            + total("mach_expert_misses_total", decode),
            "slots": int(slots.group(1)) if slots else 0}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--budget-fraction", type=float, nargs="*", default=[0.5])
    parser.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server")
    parser.add_argument("--no-resident", action="store_true", help="skip resident mach")
    parser.add_argument("--uncompiled", action="store_true",
                        help="also serve resident mach with --no-compile")  # fmt: skip
    parser.add_argument("--checkpoint",
                        help="serve this checkpoint instead of a random one; 'default' is the "
                        "embedded default model, prompted with Python")  # fmt: skip
    args = parser.parse_args()
    # Stopped from outside, still stop the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory() as tmp:
        # Every token id is one of the tokenizer's bytes, so each streamed token carries text.
        shape = {**PRESETS[args.preset], "vocab_size": BYTE_VOCAB}
        if args.checkpoint:
            path = default_model_path() if args.checkpoint == "default" else Path(args.checkpoint)
        else:
            path = write_random_qwen3_moe(Path(tmp) / "model", shape, bits=4)
        experts = check_checkpoint(path).expert_bytes
        config = json.loads((path / "config.json").read_text())
        per_expert = experts / (config["num_experts"] * config["num_hidden_layers"])
        mach_serve = [sys.executable, "-m", "mach", "serve", str(path), "--max-batch",
                      str(max(args.concurrency))]  # fmt: skip
        specs = {} if args.no_resident else {"mach": [*mach_serve, "--no-streaming"]}
        if args.uncompiled:
            specs["mach uncompiled"] = [*mach_serve, "--no-streaming", "--no-compile"]
        for fraction in args.budget_fraction:
            budget = str(int(experts * fraction))
            specs[f"mach streaming {fraction:.0%}"] = [*mach_serve, "--streaming",
                                                       "--expert-budget", budget]  # fmt: skip
        if not args.no_peer:
            peer = [sys.executable, "-m", "mlx_lm.server", "--model", str(path)]
            specs["mlx_lm.server"] = [*peer, "--decode-concurrency", str(max(args.concurrency))]
        engines = []
        try:
            for name, command in specs.items():
                port = free_port()
                engines.append(start(name, [*command, "--port", str(port)], port))
                engines[-1].expert_bytes = per_expert
            run(engines, args)
        finally:
            for engine in engines:
                engine.process.terminate()
                engine.process.wait()
    report(engines, args)


def run(engines: list[Engine], args: argparse.Namespace) -> None:
    for engine in engines:  # warm-up: first calls of every kernel, the expert banks filled
        asyncio.run(load(engine, 2, 1, 8, args.prompt_words, seed=10**6,
                         code=bool(args.checkpoint)))  # fmt: skip
    for r in range(args.rounds):
        for c in args.concurrency:
            order = engines[r % len(engines) :] + engines[: r % len(engines)]
            for engine in order:
                result = asyncio.run(load(engine, c, args.requests, args.tokens,
                                          args.prompt_words, seed=r * 100 + c,
                                          code=bool(args.checkpoint)))  # fmt: skip
                engine.rounds.setdefault(c, []).append(result)
                print(f"round {r + 1} c={c:<3} {engine.name:<15} {result.tps:7.1f} tok/s",
                      file=sys.stderr, flush=True)  # fmt: skip


def report(engines: list[Engine], args: argparse.Namespace) -> None:
    import mlx.core as mx

    model = args.checkpoint or f"preset={args.preset} 4-bit"
    print(f"{model}  device={mx.default_device()}  rounds={args.rounds}  "
          f"{args.requests} requests/client x {args.tokens} tokens, "
          f"prompts of ~{args.prompt_words} words")  # fmt: skip
    print("| engine | concurrency | total tok/s, median (range) | TTFT p50 / p99 | "
          "inter-token p50 / p99 | expert bytes / token |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for engine in engines:
        for c, rounds in engine.rounds.items():
            ttft = [t for r in rounds for t in r.ttft]
            gaps = [g for r in rounds for g in r.gaps]
            per = [r.bytes_per_token for r in rounds if r.bytes_per_token is not None]
            reads = f"{statistics.median(per) / 1e3:.1f} kB" if per else "-"
            floor = [r.floor_per_token for r in rounds if r.floor_per_token is not None]
            distinct = [r.distinct for r in rounds if r.distinct is not None]
            if floor and distinct:
                reads += (f" (floor {statistics.median(floor) / 1e3:.1f} kB; "
                          f"{statistics.median(distinct):.1f} experts / layer step)")  # fmt: skip
            failed = sum(r.failed for r in rounds)
            reads += f" ({failed} requests failed)" if failed else ""
            print(
                f"| {engine.name} | {c} | {spread([r.tps for r in rounds])} | "
                f"{pct(ttft, 0.5) * 1e3:.0f} / {pct(ttft, 0.99) * 1e3:.0f} ms | "
                f"{pct(gaps, 0.5) * 1e3:.1f} / {pct(gaps, 0.99) * 1e3:.1f} ms | {reads} |"
            )
    by_name = {e.name: e for e in engines}
    first_c = args.concurrency[0]
    for c in args.concurrency:
        parts = []
        if "mach" in by_name:
            mach_rounds = by_name["mach"].rounds
            scaling = [a.tps / b.tps for a, b in zip(mach_rounds[c], mach_rounds[first_c],
                                                     strict=True)]  # fmt: skip
            parts.append(f"mach / mach c={first_c} x{spread(scaling, '{:.2f}')}")
            if "mlx_lm.server" in by_name:
                peer = by_name["mlx_lm.server"].rounds[c]
                ratio = [a.tps / b.tps if b.tps else float("nan")
                         for a, b in zip(mach_rounds[c], peer, strict=True)]  # fmt: skip
                parts.append(f"mach / mlx_lm.server x{spread(ratio, '{:.2f}')}")
        for name, engine in by_name.items():
            if not name.startswith("mach streaming"):
                continue
            first = [r.bytes_per_token or 0.0 for r in engine.rounds[first_c]]
            now = [r.bytes_per_token or 0.0 for r in engine.rounds[c]]
            if all(first):
                ratios = [b / a for a, b in zip(first, now, strict=True)]
                parts.append(f"{name} bytes/token / c={first_c} x{spread(ratios, '{:.2f}')}")
        print(f"c={c}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
