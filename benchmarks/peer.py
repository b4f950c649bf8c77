"""Shared by the benchmarks: decode one checkpoint with mlx-lm and mach in this process."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
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
from mach.experts.device_routing import DeviceRouting

sys.path.insert(0, str(Path(__file__).parent))
from harness import Run, alternate, report, seeded, store_window, timed


def mlx_lm_engine(path: Path, prompt: list[int], tokens: int, **step: Any) -> Callable[[], Run]:
    """mlx-lm on ``path``: each call is one timed greedy generation of ``prompt``."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))

    def once() -> Run:
        steps = generate_step(mx.array(prompt), model, max_tokens=tokens, **step)
        return timed((int(t) for t, _ in steps), len(prompt))

    return once


def mach_engine(
    path: Path,
    prompt: list[int],
    tokens: int,
    prefill_step_size: int = 512,
    device_routing: bool | None = None,
    **options: Any,
) -> Callable[[], Run]:
    """mach on ``path`` (``options`` go to ``load_moe``): each call is one timed greedy
    generation, with the streaming store's prefill and decode figures. ``device_routing``
    forces streamed experts' device routing on or off (default: mach's own choice)."""
    loaded = load_moe(path, **options)
    engine = TargetEngine(loaded.model, None, loaded.cache.new,
                          prefill_step_size=prefill_step_size, passes=loaded.passes)  # fmt: skip
    if device_routing is not None:
        engine.routing = DeviceRouting.of(loaded.model, device_routing)
    params = SamplingParams(max_tokens=tokens)

    def once() -> Run:
        since = store_window(loaded.store)
        run = timed((e.token for e in engine.stream(prompt, params) if e.token is not None),
                    len(prompt))  # fmt: skip
        run.figures.update(since(len(run.tokens)))
        return run

    return once


def compare_decode(path: Path, prompt: list[int], tokens: int, title: str, rounds: int,
                   uncompiled: bool = False) -> None:  # fmt: skip
    """mlx-lm and mach (and, with ``uncompiled``, mach building every step op by op) on one
    checkpoint, alternating round by round; print the table."""
    engines = [("mlx-lm", mlx_lm_engine(path, prompt, tokens)),
               ("mach", mach_engine(path, prompt, tokens))]  # fmt: skip
    if uncompiled:
        engines.append(("mach uncompiled", mach_engine(path, prompt, tokens, compile=False)))
    results = alternate(engines, rounds)
    report(results, "mlx-lm", f"{title}  prompt {len(prompt)}  decode {tokens}")


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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--uncompiled", action="store_true", help="also mach with --no-compile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with seeded(0):
            path = write_model(Path(tmp) / "model")
        prompt = np.random.default_rng(0).integers(0, 256, args.prompt_tokens).tolist()
        compare_decode(path, prompt, args.tokens, title, args.rounds, args.uncompiled)
