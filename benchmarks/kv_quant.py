"""Quantized KV caches against full precision: quality, bytes and decode speed, in one run.

Part 1, a seeded random qwen3_moe (head_dim 128) at each ``--contexts`` length: per KV format,
the logit KL divergence and top-1 agreement against full precision after the prompt, the
attention-output cosine of the first layer's decode step, the KV bytes held, and decode tok/s.
Formats alternate round by round; tok/s is the median over rounds, with the range, and the
ratio to full precision is the median (range) of the per-round ratios.

Part 2, a needle for one attention head: among T keys one is aligned with the query; a hit is
an output closest to that key's value. (The embedded default model is too small to recall a
planted line at all, so retrieval is measured where it happens: in attention.)

    uv run python benchmarks/kv_quant.py [--contexts 1024 4096 16384] [--rounds 3] [--portable]

TurboQuant decodes through kernels that read the codes on a CUDA GPU and through NumPy on a
CPU; ``--portable`` adds rows for the path built from MLX ops alone, which expands every code
at every step (``MACH_TURBOQUANT_KERNEL=0 MACH_TURBOQUANT_HOST=0``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from mach import load_moe
from mach.cache.kv import KVCache
from mach.default_model import write_random_qwen3_moe

FORMATS: dict[str, dict[str, Any]] = {
    "full": {},
    "turboquant 4": {"kv_bits": 4},
    "turboquant 3": {"kv_bits": 3},
    "turboquant 2": {"kv_bits": 2},
    "affine 8": {"kv_bits": 8, "kv_format": "affine"},
    "affine 4": {"kv_bits": 4, "kv_format": "affine"},
}
SYNTHETIC = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 2, "head_dim": 128, "num_experts": 16,
             "num_experts_per_tok": 4, "moe_intermediate_size": 128,
             "max_position_embeddings": 32768}  # fmt: skip


PORTABLE = " portable"


@contextlib.contextmanager
def path_for(name: str) -> Iterator[None]:
    """The MLX-ops TurboQuant path for the rows named ``... portable``."""
    if not name.endswith(PORTABLE):
        yield
        return
    os.environ["MACH_TURBOQUANT_KERNEL"] = os.environ["MACH_TURBOQUANT_HOST"] = "0"
    try:
        yield
    finally:
        del os.environ["MACH_TURBOQUANT_KERNEL"], os.environ["MACH_TURBOQUANT_HOST"]


def kv_bytes(cache: Any) -> int:
    return sum(getattr(c, "stored_bytes", None) or _kv_held(c) for c in cache)


def _kv_held(layer: Any) -> int:
    if isinstance(layer, KVCache) and layer.state is not None:
        return sum(a.nbytes for a in layer.state)
    return 0


def first_attention(model: Any, cache: Any, token: mx.array) -> mx.array:
    """The first layer's attention output for ``token`` (its cache advanced by one)."""
    layer = model.model.layers[0]
    h = model.model.embed_tokens(token)
    return layer.self_attn(layer.input_layernorm(h), cache=cache[0])


def synthetic(contexts: list[int], rounds: int, tokens: int, portable: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="mach-kvq-"))
    path = write_random_qwen3_moe(root / "model", SYNTHETIC)
    formats = dict(FORMATS)
    if portable:
        formats |= {name + PORTABLE: opts for name, opts in FORMATS.items()
                    if name.startswith("turboquant")}  # fmt: skip
    loaded = {name: load_moe(path, **opts) for name, opts in formats.items()}
    print(f"{mx.default_device()}  random qwen3_moe {SYNTHETIC['num_hidden_layers']} layers, "
          f"head_dim 128, {SYNTHETIC['num_key_value_heads']} KV heads; decode {tokens} tokens, "
          f"{rounds} rounds")  # fmt: skip
    rng = np.random.default_rng(0)
    for context in contexts:
        prompt = mx.array(rng.integers(0, 256, context).astype(np.uint32))[None]
        caches, logits, attn = {}, {}, {}
        for name, model in loaded.items():
            cache = model.cache.new()
            for start in range(0, context - 1, 2048):
                mx.eval(model.model(prompt[:, start : min(start + 2048, context - 1)],
                                    cache=cache))  # fmt: skip
            probe = model.cache.new()
            for start in range(0, context - 1, 2048):
                mx.eval(model.model(prompt[:, start : min(start + 2048, context - 1)],
                                    cache=probe))  # fmt: skip
            with path_for(name):
                attn[name] = first_attention(model.model, probe, prompt[:, -1:])
                logits[name] = model.model(prompt[:, -1:], cache=cache)[0, -1].astype(mx.float32)
                mx.eval(logits[name], attn[name])
            caches[name] = cache
        speed: dict[str, list[float]] = {name: [] for name in loaded}
        # Round -1 is untimed: it builds each format's kernels and graphs for this length.
        for round_ in range(-1, rounds):
            order = list(loaded) if round_ % 2 == 0 else list(reversed(loaded))
            for name in order:
                cache, token = caches[name], mx.array([[5]])
                with path_for(name):
                    start = time.perf_counter()
                    for _ in range(tokens):
                        out = loaded[name].model(token, cache=cache)
                        token = mx.argmax(out[:, -1], axis=-1)[:, None]
                        mx.eval(token)
                    if round_ >= 0:
                        speed[name].append(tokens / (time.perf_counter() - start))
                for layer in cache:
                    layer.trim(tokens)
        ref = logits["full"]
        ref_p = mx.softmax(ref)
        print(f"\ncontext {context}")
        print("| format | KV bytes | vs float16 | logit KL | top-1 | attention cosine "
              "| decode tok/s | vs full |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        # The yardstick is float16 KV; the random model computes in float32.
        full_bytes = kv_bytes(caches["full"]) // 2
        for name in loaded:
            kl = (ref_p * (mx.log(ref_p + 1e-30) - mx.log(mx.softmax(logits[name]) + 1e-30))).sum()
            a, b = attn["full"].reshape(-1), attn[name].reshape(-1)
            cosine = (a * b).sum() / (mx.linalg.norm(a) * mx.linalg.norm(b))
            same = int(mx.argmax(logits[name]).item() == mx.argmax(ref).item())
            ratios = [s / f for s, f in zip(speed[name], speed["full"], strict=True)]
            size = kv_bytes(caches[name])
            print(f"| {name} | {size / 1e6:.2f} MB | {size / full_bytes:.3f} | {kl.item():.2e} "
                  f"| {same} | {cosine.item():.5f} | {statistics.median(speed[name]):.1f} "
                  f"({min(speed[name]):.1f}-{max(speed[name]):.1f}) | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-"
                  f"{max(ratios):.2f}) |")  # fmt: skip


def needle(trials: int, contexts: list[int], weight: float = 0.1) -> None:
    """Retrieval by one attention head: among ``T`` keys (Gaussian, with outlier channels) one
    is aligned with the query so that full precision gives it ``weight`` of the softmax; a
    trial is a hit when the output is closest to that key's value among all values."""
    from mach.cache.affine_kv import AffineKVCache
    from mach.cache.turboquant import TurboQuantKVCache

    dim, scale = 128, 1 / math.sqrt(128)
    make = {"full": KVCache, "turboquant 4": lambda: TurboQuantKVCache(4),
            "turboquant 3": lambda: TurboQuantKVCache(3),
            "turboquant 2": lambda: TurboQuantKVCache(2), "affine 8": lambda: AffineKVCache(8),
            "affine 4": lambda: AffineKVCache(4)}  # fmt: skip
    rng = np.random.default_rng(1)
    print(f"\nneedle: one key in T holds {weight:.0%} of the softmax at full precision, "
          f"{trials} trials per length")  # fmt: skip
    print("| format | " + " | ".join(f"T={t}" for t in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    hits = {name: [0] * len(contexts) for name in make}
    for column, length in enumerate(contexts):
        for _ in range(trials):
            keys = rng.normal(size=(1, 1, length, dim)).astype(np.float32)
            keys[..., :4] *= 8.0
            values = rng.normal(size=(1, 1, length, dim)).astype(np.float32)
            query = rng.normal(size=(1, 1, 1, dim)).astype(np.float32)
            scores = (keys[0, 0] @ query[0, 0, 0]) * scale
            rest = np.log(np.exp(scores - scores.max()).sum()) + scores.max()
            target = rest + math.log(weight / (1 - weight))
            spot = int(rng.integers(0, length))
            direction = query[0, 0, 0] / np.linalg.norm(query[0, 0, 0])
            keys[0, 0, spot] = direction * target / (scale * np.linalg.norm(query[0, 0, 0]))
            k, v, q = mx.array(keys), mx.array(values), mx.array(query)
            for name, build in make.items():
                cache = build()
                out = attend_all(cache, q, k, v, scale)
                sims = (mx.array(values[0, 0]) @ out.reshape(-1)) / mx.linalg.norm(
                    mx.array(values[0, 0]), axis=-1)  # fmt: skip
                hits[name][column] += int(mx.argmax(sims).item() == spot)
    for name, row in hits.items():
        print(f"| {name} | " + " | ".join(f"{h}/{trials}" for h in row) + " |")


def attend_all(cache: Any, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """One query over keys ``k`` and values ``v`` stored in ``cache``."""
    from mach.layers.attention import attend

    if isinstance(cache, KVCache):
        cache.update_and_fetch(k[:, :, :-1], v[:, :, :-1])
    else:
        cache.update(k[:, :, :-1], v[:, :, :-1])
    return attend(q, k[:, :, -1:], v[:, :, -1:], cache, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--needle-trials", type=int, default=50)
    parser.add_argument("--no-needle", action="store_true")
    parser.add_argument("--portable", action="store_true",
                        help="add TurboQuant rows that expand the codes at every step")  # fmt: skip
    args = parser.parse_args()
    synthetic(args.contexts, args.rounds, args.tokens, args.portable)
    if not args.no_needle:
        needle(args.needle_trials, args.contexts)


if __name__ == "__main__":
    main()
