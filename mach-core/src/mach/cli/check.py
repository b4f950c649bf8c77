"""``mach check``: what each checkpoint can run, from its headers alone."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from mach.io.options import LoadOptions

from mach.cli import reports_errors
from mach.cli.download import fetch_if_missing
from mach.cli.residency import (
    takes_load_options,
)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _row(r: dict[str, Any]) -> list[str]:
    if not r["loads"]:
        return [r["path"], "-", "-", "-", "-", "-", "-", "-", "cannot load: " + r["diagnosis"]]
    store, resident = r["store"], r["residency"]["resident"]
    stream = r["residency"]["streaming"]
    mem = (f"{_gb(resident['memory_bytes']) if resident['available'] else 'no'} / "
           + (_gb(stream["memory_bytes"]) if stream["available"] else "no"))  # fmt: skip
    summary = r["arch_summary"]
    batching = "yes" if r["continuous_batching"] else "no (sequential)"
    prefix = _feature(summary, "prefix_reuse")
    serve = "chat+tools" if r["serving"]["tools"] else (
        "chat" if r["serving"]["chat_completions"] else (
            "completions" if r["serving"]["completions"] else "no"))  # fmt: skip
    if r["serving"]["structured_output"]:
        serve += "+json"
    verdict = f"ok: loads {store['residency']}, {_gb(store['memory_bytes'])}"
    if store.get("budget_bytes"):
        slots = (f"{store['pool_slots']} shared slots" if store.get("slot_pool") == "shared"
                 else f"{store['slots_per_layer']} slots/layer")  # fmt: skip
        verdict += f" ({slots} in {_gb(store['budget_bytes'])})"
    if r["warnings"]:
        verdict += f" ({'; '.join(r['warnings'])})"
    spec = r["specdec_kind"] or "no"
    if r["specdec_kind"] and not r["draft_present"]:
        spec += " (no draft weights)"
    return [r["path"], r["arch"], r["layout"], r["routed_quantization"] or "-",
            f"{_gb(r['expert_bytes'])} + {_gb(r['non_expert_bytes'])}", mem,
            f"{r['bytes_per_token_cold'] / 1e6:.2f} MB -> {r['decode_bound_cold_tps']:.0f} tok/s",
            f"batch {batching}, prefix {prefix}, spec {spec}, serve {serve}",
            verdict]  # fmt: skip


def _feature(summary: dict[str, Any], name: str) -> str:
    if name in summary.get("unavailable", {}):
        return "not yet"
    return {True: "yes", False: "no", None: "unknown"}[summary[name]]


HEADER = ["path", "arch", "layout", "experts", "experts + rest", "memory resident / streaming",
          "cold read/token -> bound", "capabilities", "verdict"]  # fmt: skip


@reports_errors
@takes_load_options
def check_command(
    paths: Annotated[
        list[str], typer.Argument(help="Checkpoint folders or hub ids (fetched when missing).")
    ],
    ssd_gbps: Annotated[float, typer.Option(help="SSD read bandwidth for the bound, GB/s.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    *,
    options: LoadOptions,
) -> None:
    """Predict what each checkpoint can run, reading headers only (no tensor data).

    The load options are those of `mach generate`: the verdict and the memory figures are
    what loading with the same options does.
    """
    from mach.check import check_checkpoint
    from mach.experts.parallel import expert_shard

    for path in paths:
        fetch_if_missing(path)
    reports = [check_checkpoint(p, options, ssd_gbps).to_dict() for p in paths]
    shard = expert_shard()
    if shard is not None and shard.rank != 0:  # under mlx.launch rank 0 speaks for all
        pass
    elif as_json:
        typer.echo(json.dumps({"checkpoints": reports}, indent=2))
    else:
        rows = [HEADER, *(_row(r) for r in reports)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            typer.echo("  ".join([*cells, row[-1]]))
        for r in reports:
            parallel = r["parallel"]
            if r["loads"] and parallel["ranks"] > 1 and parallel["mode"] == "pipeline":
                spans = ", ".join(f"{lo}-{hi - 1}" for lo, hi in parallel["layers"])
                typer.echo(f"{r['path']}: pipeline parallel over {parallel['ranks']} ranks: "
                           f"layers {spans}; each keeps up to "
                           f"{_gb(parallel['bytes_per_rank'])} of weights")  # fmt: skip
            elif r["loads"] and parallel["ranks"] > 1:
                typer.echo(f"{r['path']}: expert parallel over {parallel['ranks']} ranks: each "
                           f"holds up to {parallel['experts_per_layer_per_rank']} of "
                           f"{r['experts_per_layer']} experts per layer ("
                           f"{_gb(parallel['expert_bytes_per_rank'])} of the checkpoint's "
                           "experts)")  # fmt: skip
            if r["dispatch"]:
                typer.echo(f"{r['path']}: expert kernels here: decode {r['dispatch']['decode']}; "
                           f"prefill {r['dispatch']['prefill']}")  # fmt: skip
    if not all(r["loads"] for r in reports):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("check")(check_command)
