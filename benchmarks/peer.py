"""Shared by the benchmarks: decode one checkpoint with mlx-lm and mach in this process."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mach  # noqa: F401 - first: on Linux it picks the BLAS MLX binds to (mach/_blas.py)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mach import load_moe
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.default_model.random_qwen3_moe import _tokenizer_json


def timed(tokens: Iterable[int]) -> tuple[list[int], float]:
    """Token ids and decode tokens/s, timed from the first token (prefill excluded)."""
    ids, stamps = [], []
    for token in tokens:
        ids.append(token)
        stamps.append(time.perf_counter())
    return ids, (len(ids) - 1) / (stamps[-1] - stamps[0])


def compare_decode(path: Path, prompt: list[int], tokens: int, title: str) -> None:
    """Greedy decode with mlx-lm, then mach (one warm-up each); print tok/s and the ratio."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    peer, _ = load(str(path))
    list(generate_step(mx.array(prompt[:8]), peer, max_tokens=4))
    peer_ids, peer_tps = timed(
        int(t) for t, _ in generate_step(mx.array(prompt), peer, max_tokens=tokens)
    )
    model, _, _, cache = load_moe(path)
    engine = TargetEngine(model, None, cache.new)
    engine.generate(prompt[:8], SamplingParams(max_tokens=4))
    stream = engine.stream(prompt, SamplingParams(max_tokens=tokens))
    ids, tps = timed(e.token for e in stream if e.token is not None)
    same = next((i for i, (a, b) in enumerate(zip(ids, peer_ids, strict=False)) if a != b),
                len(ids))  # fmt: skip
    print(f"{mx.default_device()}  {title}  prompt {len(prompt)}  decode {tokens}")
    print(f"  mach    decode {tps:8.1f} tok/s")
    print(f"  mlx_lm  decode {peer_tps:8.1f} tok/s")
    print(f"  mach / mlx-lm: decode x{tps / peer_tps:.3f}  same greedy prefix: {same}/{len(ids)}")


def save_peer_model(
    root: Path, model: Any, config: dict[str, Any], quantization: dict[str, Any]
) -> Path:
    """Write an mlx-lm model (already quantized as ``quantization`` says) as a checkpoint folder
    both engines load: mlx-community layout, the byte-level tokenizer of mach's random models."""
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    root.mkdir(parents=True)
    mx.save_safetensors(str(root / "model.safetensors"), weights, metadata={"format": "mlx"})
    (root / "config.json").write_text(json.dumps({**config, "quantization": quantization}))
    (root / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    return root


def quantize_4bit(model: Any) -> dict[str, Any]:
    """Affine 4-bit, group 64, for every layer whose input size allows it."""
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % 64 == 0)  # fmt: skip
    return {"group_size": 64, "bits": 4, "mode": "affine"}


def run_synthetic(
    doc: str, write_model: Callable[[Path], Path], title: str, prompt_tokens: int
) -> None:
    """A family benchmark's command line: build the synthetic model, decode it with both."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "model")
        prompt = np.random.default_rng(0).integers(0, 256, args.prompt_tokens).tolist()
        compare_decode(path, prompt, args.tokens, title)
