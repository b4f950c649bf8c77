"""``mach archs`` / ``mach-archs``: which architectures are installed and what they can do."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from mach import plugins
from mach.registry import arch_summary, install_hint, list_archs


def _render(as_json: bool) -> None:
    summaries = [arch_summary(a) for a in list_archs()]
    failures = plugins.plugin_failures()
    if as_json:
        typer.echo(json.dumps({"archs": summaries, "plugin_errors": failures}, indent=2))
        return
    for name, reason in failures.items():
        typer.echo(f"warning: plugin {name!r} failed to load: {reason}", err=True)
    if not summaries:
        typer.echo(
            "No architectures are installed: mach-core alone runs no model.\n"
            f"Install a family, e.g. {install_hint('qwen')}, or all of them with "
            f"{install_hint()}."
        )
        return
    for s in summaries:
        provider = f"{s['distribution'] or '?'} {s['version'] or ''}".strip()
        typer.echo(f"{s['name']}  ({provider})")
        if s["description"]:
            typer.echo(f"  {s['description']}")
        typer.echo(
            f"  kv_cache_kind={s['kv_cache_kind']}  specdec_kind={s['specdec_kind']}  "
            f"swiglu_variant={s['swiglu_variant']}  has_expert_bias={s['has_expert_bias']}"
        )
        typer.echo(
            f"  layouts={','.join(s['layouts'])}  "
            f"routed_quantization={','.join(s['routed_quantization'])}  "
            f"expert_stores={','.join(s['expert_stores'])}  "
            f"cache_backends={','.join(s['cache_backends'])}"
        )
        prefix = "yes" if s["prefix_reuse"] else "no"
        typer.echo(f"  continuous_batching={_batching(s)}  prefix_reuse={prefix}")
        if s["unavailable"]:
            typer.echo(f"  not yet in mach: {', '.join(s['unavailable'])}")


def _batching(summary: dict[str, Any]) -> str:
    value = summary["continuous_batching"]
    if value is None:
        return "when its sliding window keeps no prefix (checked at load)"
    return "yes" if value else "no (sequences decode one at a time)"


def archs_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List installed architectures with their capabilities and providing package."""
    _render(as_json)


def register(app: typer.Typer) -> None:
    app.command("archs")(archs_command)


def archs_main() -> None:
    """Entry point of the ``mach-archs`` console script."""
    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli.command()(archs_command)
    cli(args=sys.argv[1:], prog_name="mach-archs")
