"""``mach bench``: a standard decode benchmark on one model."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from mach.io.options import LoadOptions

from mach.cli import reports_errors
from mach.cli.download import model_folder
from mach.cli.residency import (
    load_model,
    store_line,
    store_report,
    takes_load_options,
)


@reports_errors
@takes_load_options
def bench_command(
    model: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Argument(help="Checkpoint folder or hub id; omit for the embedded default model."),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 128,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens to decode.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs after one warm-up.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    *,
    options: LoadOptions,
) -> None:
    """Prefill a random prompt, decode greedily, and report speed and expert traffic."""
    import mlx.core as mx
    import numpy as np

    from mach.decode.engine import TargetEngine
    from mach.decode.params import SamplingParams

    if model is None:
        from mach.default_model import default_model_path

        model = str(default_model_path())
    folder = model_folder(model)
    start = time.perf_counter()
    loaded = load_model(folder, options)
    net, _, store, cache = loaded
    load_seconds = time.perf_counter() - start
    vocab = int(net(mx.array([[0]])).shape[-1])
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist()
    engine = TargetEngine(net, None, cache.new, passes=loaded.passes)
    params = SamplingParams(max_tokens=tokens)
    engine.generate(prompt, params)
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        before = store.stats()
        result = engine.generate(prompt, params)
        after = store.stats()
        delta = {k: after[k] - before[k] for k in ("hits", "misses", "bytes_read", "read_seconds")
                 if k in after}  # fmt: skip
        if delta:
            looked_up = delta["hits"] + delta["misses"]
            merged = {**after, **delta, "hit_rate": delta["hits"] / looked_up if looked_up else 0.0,
                      "read_gbps": delta["bytes_read"] / delta["read_seconds"] / 1e9
                      if delta["read_seconds"] else 0.0}  # fmt: skip
        else:
            merged = after
        runs.append(
            {**result.stats.to_dict(), "experts": store_report(merged, prompt_tokens + tokens)}
        )
    best = max(runs, key=lambda r: r["generation_tps"])
    report = {"model": model, "store": store.kind, "load_seconds": load_seconds,
              "prompt_tokens": prompt_tokens, "decode_tokens": tokens, **best}  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(
        f"{model}: {store.kind} store, loaded in {load_seconds:.1f} s\n"
        f"prefill {report['prompt_tps']:.1f} tok/s ({prompt_tokens} tokens) | decode "
        f"{report['generation_tps']:.1f} tok/s ({tokens} tokens) | peak memory "
        f"{report['peak_memory_bytes'] / 1e9:.3f} GB"
    )
    if report["experts"]:
        typer.echo(store_line(report["experts"]))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
