"""One layer's attention call over TurboQuant codes against MLX's fused full-precision call.

A decode step's query block (8 query heads over 2 KV heads, head_dim 128) over a cache of
``T`` positions: per call, the full-precision step (append + fused attention), the TurboQuant
step (quantize + attend), and each TurboQuant piece alone (``attend``: the kernels on a CUDA
GPU, NumPy on a CPU; ``encode``), each timed two ways: ``synced`` waits for every call
(latency), ``queued`` waits once after all of them (throughput, what a model's layers see).

    uv run python benchmarks/turboquant_calls.py [--positions 1024 16384] [--calls 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from mach.cache.kv import KVCache
from mach.cache.turboquant import TurboQuantKVCache, attend_rows, encode_rows
from mach.layers.attention import attend


def normal(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def per_call(fn: Callable[[], object], calls: int, synced: bool) -> float:
    """Microseconds per call of ``fn``."""
    for _ in range(10):
        mx.eval(fn())
    start, held = time.perf_counter(), []
    for _ in range(calls):
        out = fn()
        if synced:
            mx.eval(out)
        else:
            held.append(out)
    mx.eval(held)
    return (time.perf_counter() - start) / calls * 1e6


def measure(positions: int, calls: int, bits: int) -> None:
    keys, values = normal((1, 2, positions, 128), 1), normal((1, 2, positions, 128), 2)
    q = normal((1, 8, 1, 128), 3)
    k1, v1 = normal((1, 2, 1, 128), 4), normal((1, 2, 1, 128), 5)
    full = KVCache()
    full.update_and_fetch(keys, values)
    quant = TurboQuantKVCache(bits)
    quant.update(keys, values)
    codecs = quant.codecs(128)
    assert quant.k_rows is not None and quant.v_rows is not None
    assert full.keys is not None and full.values is not None
    stored = (quant.k_rows, quant.v_rows)
    fk, fv = full.keys[..., :positions, :], full.values[..., :positions, :]

    def full_step() -> mx.array:
        out = attend(q, k1, v1, full, 0.1)
        full.trim(1)
        return out

    def quant_step() -> mx.array:
        out = attend(q, k1, v1, quant, 0.1)
        quant.trim(1)
        return out

    timed: dict[str, Callable[[], object]] = {
        "full precision step": full_step,
        "turboquant step": quant_step,
        "turboquant attend": lambda: attend_rows(q, codecs, stored, positions, 0.1, None, None),
        "turboquant encode": lambda: encode_rows(k1, v1, codecs, positions + 1),
        "fused attention alone": lambda: mx.fast.scaled_dot_product_attention(q, fk, fv, scale=0.1),
    }
    for name, fn in timed.items():
        synced = per_call(fn, calls, synced=True)
        queued = per_call(fn, calls, synced=False)
        print(f"| {positions} | {name} | {synced:.1f} | {queued:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    print(f"{mx.default_device()}  {args.bits}-bit TurboQuant, 8 query / 2 KV heads, dim 128")
    print("| positions | call | synced us | queued us |")
    print("|---|---|---|---|")
    for positions in args.positions:
        measure(positions, args.calls, args.bits)


if __name__ == "__main__":
    main()
