"""What every benchmark here shares, so its figures can be trusted on a noisy shared machine.

- ``alternate`` runs the engines round by round (who goes first rotates), after one untimed
  warm-up each, so a slow patch of the machine lands on every engine, not on one.
- A ``Run`` keeps prefill and decode apart: time, tokens, and for a streaming store the bytes
  read and hit rate of each phase (``store_window``).
- ``report`` prints the median and range of every figure over rounds, and the median and range
  of the per-round ratio to a baseline: one round proves nothing.
- ``seeded`` seeds MLX, NumPy and Python before a model is synthesized.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np


@dataclass
class Run:
    """One timed generation: prefill is request to first token, decode the tokens after it."""

    prompt_tokens: int
    tokens: list[int]
    prefill_s: float
    decode_s: float
    figures: dict[str, float] = field(default_factory=dict)
    """Further per-run figures, e.g. ``decode_mb_per_token`` or ``tokens_per_pass``."""
    streams: int = 1
    """Generations the run holds; the first token of each is prefill's."""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        decoded = len(self.tokens) - self.streams
        return decoded / self.decode_s if self.decode_s else float("nan")

    def value(self, name: str) -> float:
        if name in ("prefill_tps", "decode_tps"):
            return float(getattr(self, name))
        return self.figures.get(name, float("nan"))


def timed(tokens: Iterable[int], prompt_tokens: int) -> Run:
    """Drain a token stream started just now, stamping the first token and the last."""
    start = time.perf_counter()
    ids: list[int] = []
    first = start
    for token in tokens:
        if not ids:
            first = time.perf_counter()
        ids.append(token)
    end = time.perf_counter()
    return Run(prompt_tokens, ids, first - start, end - first)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed MLX, NumPy and Python, so a synthesized model is the same in every run."""
    mx.random.seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield


def store_window(store: Any) -> Callable[[int], dict[str, float]]:
    """Snapshot a store's counters now; ``since(tokens)`` gives the figures of the generation
    of ``tokens`` tokens since then, with prefill and decode apart. A resident store has none."""
    before = store.stats() if store is not None else {}
    if "decode" not in before:
        return lambda tokens: {}

    def since(tokens: int) -> dict[str, float]:
        after = store.stats()
        out: dict[str, float] = {}
        for phase in ("prefill", "decode"):
            hits = after[phase]["hits"] - before[phase]["hits"]
            misses = after[phase]["misses"] - before[phase]["misses"]
            read = after[phase]["bytes_read"] - before[phase]["bytes_read"]
            out[f"{phase}_hit_rate"] = hits / (hits + misses) if hits + misses else float("nan")
            out[f"{phase}_mb"] = read / 1e6
        out["decode_mb_per_token"] = out["decode_mb"] / max(1, tokens - 1)
        seconds = after["read_seconds"] - before["read_seconds"]
        total = after["bytes_read"] - before["bytes_read"]
        out["read_gbps"] = total / seconds / 1e9 if seconds else float("nan")
        return out

    return since


Engine = tuple[str, Callable[[], Run]]


def alternate(engines: Sequence[Engine], rounds: int, warmups: int = 1) -> dict[str, list[Run]]:
    """``rounds`` runs of every engine, the order rotating each round, after untimed warm-ups
    (first kernel calls, allocator, a streaming bank filled as in steady use)."""
    for _, run in engines:
        for _ in range(warmups):
            run()
    results: dict[str, list[Run]] = {name: [] for name, _ in engines}
    for r in range(rounds):
        order = list(engines[r % len(engines) :]) + list(engines[: r % len(engines)])
        for name, run in order:
            result = run()
            results[name].append(result)
            print(f"round {r + 1}  {name:<24} prefill {result.prefill_tps:9.1f} tok/s  "
                  f"decode {result.decode_tps:8.2f} tok/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return results


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``median (min-max)``."""
    kept = [v for v in values if v == v]
    if not kept:
        return "-"
    low, mid, high = (fmt.format(v) for v in (min(kept), statistics.median(kept), max(kept)))
    return f"{mid} ({low}-{high})"


def per_round_ratio(a: Sequence[Run], b: Sequence[Run], name: str) -> list[float]:
    """``a / b`` of one figure, round by round (the rounds ran back to back)."""
    return [x.value(name) / y.value(name) for x, y in zip(a, b, strict=True)]


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))  # fmt: skip


FIGURES = {
    "prefill_tps": ("prefill tok/s", "{:.1f}"),
    "decode_tps": ("decode tok/s", "{:.2f}"),
    "prefill_hit_rate": ("prefill hit rate", "{:.1%}"),
    "decode_hit_rate": ("decode hit rate", "{:.1%}"),
    "prefill_mb": ("prefill MB read", "{:.1f}"),
    "decode_mb_per_token": ("decode MB read / token", "{:.2f}"),
    "read_gbps": ("read GB/s", "{:.2f}"),
    "read_bound_share": ("share of read bound", "{:.0%}"),
    "tokens_per_pass": ("tokens / pass", "{:.2f}"),
    "accept_rate": ("accepted / drafted", "{:.2f}"),
    "decode_loads_per_token": ("decode loads / token", "{:.2f}"),
    "peak_gb": ("peak GB", "{:.2f}"),
}


def report(results: dict[str, list[Run]], baseline: str, title: str) -> None:
    """A markdown table (median and range over rounds) and each engine's per-round ratio to
    ``baseline`` for prefill and decode, with how many greedy tokens agree with it."""
    names = [n for n in FIGURES if any(n in ("prefill_tps", "decode_tps") or n in r.figures
                                       for runs in results.values() for r in runs)]  # fmt: skip
    rounds = len(next(iter(results.values())))
    print(f"{title}  device={mx.default_device()}  rounds={rounds} (median (range))")
    print("| engine | " + " | ".join(FIGURES[n][0] for n in names) + " | same tokens |")
    print("|---" * (len(names) + 2) + "|")
    base = results[baseline]
    for engine, runs in results.items():
        cells = [spread([r.value(n) for r in runs], FIGURES[n][1]) for n in names]
        same = min(same_prefix(r.tokens, b.tokens) for r, b in zip(runs, base, strict=True))
        cells.append(f"{same}/{len(base[0].tokens)}")
        print(f"| {engine} | " + " | ".join(cells) + " |")
    for engine, runs in results.items():
        if engine == baseline:
            continue
        prefill = spread(per_round_ratio(runs, base, "prefill_tps"), "{:.2f}")
        decode = spread(per_round_ratio(runs, base, "decode_tps"), "{:.2f}")
        print(f"    {engine} / {baseline}: prefill x{prefill}  decode x{decode}")
