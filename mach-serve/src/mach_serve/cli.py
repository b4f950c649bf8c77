"""``mach serve`` (added to the mach CLI by this plugin) and the ``mach-serve`` script."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from mach.io.options import LoadOptions

from mach.cli import reports_errors
from mach.cli.residency import (
    Draft,
    DraftTokens,
    takes_load_options,
)


@reports_errors
@takes_load_options
def serve_command(
    model: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Argument(help="Checkpoint folder; omit for the embedded default model."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model_name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Model id clients use (default: the folder name)."),
    ] = None,
    api_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="MACH_API_KEY", help="Require Authorization: Bearer <key>."),
    ] = None,
    cors_origin: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="Allow browser requests from this origin (repeatable)."),
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait.")] = 32,
    max_body_bytes: Annotated[int, typer.Option(min=1024)] = 4 * 2**20,
    draft: Draft = None,
    draft_tokens: DraftTokens = 2,
    *,
    options: LoadOptions,
) -> None:
    """Serve a model over HTTP with the OpenAI API."""
    from mach_serve.server import build_state, run

    state = build_state(
        model,
        model_name=model_name,
        api_key=api_key,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        options=options,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    typer.echo(f"mach: serving {state.model_id} on http://{host}:{port}/v1", err=True)
    run(state, host, port, cors_origin)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def serve_main() -> None:
    """Entry point of the ``mach-serve`` console script."""
    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli.command()(serve_command)
    cli(args=sys.argv[1:], prog_name="mach-serve")
