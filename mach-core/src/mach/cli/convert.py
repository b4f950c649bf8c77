"""``mach convert``: write a checkpoint in mach's engine format."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from mach.cli import reports_errors
from mach.cli.download import model_folder


@reports_errors
def convert_command(
    source: Annotated[
        str,
        typer.Argument(help="Checkpoint folder in any layout its adapter reads, or a hub id."),
    ],
    target: Annotated[str, typer.Argument(help="New folder for the engine-format checkpoint.")],
    bits: Annotated[
        Optional[int],  # noqa: UP045 - typer reads the annotation at run time
        typer.Option(help="Quantize to 4 or 8 bits (affine; routers at 8)."),
    ] = None,
    group_size: Annotated[int, typer.Option(help="Quantization group size.")] = 64,
) -> None:
    """Convert a checkpoint to mach's engine format: experts in a sidecar, one record each."""
    from mach.io.convert import convert

    folder = model_folder(source)
    with typer.progressbar(length=1, label="converting", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        out = convert(folder, target, bits=bits, group_size=group_size, progress=progress)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
