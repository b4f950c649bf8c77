"""``mach serve`` (added to the mach CLI by this plugin) and the ``mach-serve`` script."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from mach.io.options import LoadOptions

from mach.cli import reports_errors
from mach.cli.download import model_folder
from mach.cli.residency import (
    Draft,
    DraftTokens,
    Quiet,
    load_progress,
    takes_load_options,
)
from mach_serve.limits import HTTPLimits

LIMITS = HTTPLimits()


@reports_errors
@takes_load_options
def serve_command(
    model: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Argument(
            help="Checkpoint folder or hub id (org/name; fetched when not in the local HF "
            "cache). Omit for the embedded default model."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model_name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Model id clients use (default: the hub id or the folder name)."),
    ] = None,
    api_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="MACH_API_KEY", help="Require Authorization: Bearer <key>."),
    ] = None,
    cors_origin: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="Allow browser requests from this origin (repeatable)."),
    ] = None,
    allowed_host: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="Also answer requests whose Host header names this (repeatable; '*' answers "
            "any). On loopback only localhost, 127.0.0.1 and [::1] are answered by default."
        ),
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait.")] = 32,
    max_batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Requests decoded together (continuous batching); 1 serves one at a time. "
            "Architectures whose cache cannot batch, and speculative decoding, run one at a time.",
        ),
    ] = 8,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest request body in bytes.")
    ] = 4 * 2**20,
    max_prompt_bytes: Annotated[
        int, typer.Option(min=1, help="Largest prompt text in UTF-8 bytes, before templating.")
    ] = 2**20,
    max_prompt_tokens: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Most prompt tokens (default: what the context allows)."),
    ] = None,
    keep_alive_timeout: Annotated[
        int, typer.Option(min=1, help="Seconds an idle keep-alive connection stays open.")
    ] = LIMITS.keep_alive,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request's headers may take to arrive.")
    ] = LIMITS.header_timeout,
    body_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request's body may take to arrive.")
    ] = 30.0,
    max_header_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest request head (request line and headers).")
    ] = LIMITS.max_header_bytes,
    limit_concurrency: Annotated[
        int, typer.Option(min=1, help="Open connections at once; beyond them, 503.")
    ] = LIMITS.limit_concurrency,
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="Seconds the running request gets after SIGTERM.")
    ] = LIMITS.shutdown_grace,
    draft: Draft = None,
    draft_tokens: DraftTokens = None,
    prompt_cache: Annotated[
        bool,
        typer.Option(
            "--prompt-cache/--no-prompt-cache",
            help="Reuse the longest cached prefix of each prompt instead of prefilling it.",
        ),
    ] = True,
    prompt_cache_bytes: Annotated[
        str, typer.Option(help="Memory for cached prompt prefixes, e.g. 2GB.")
    ] = "2GiB",
    prompt_cache_dir: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Also keep prefixes in this folder, across restarts and processes."),
    ] = None,
    prompt_cache_disk_bytes: Annotated[
        str, typer.Option(help="Disk space for cached prefixes in --prompt-cache-dir.")
    ] = "16GiB",
    quiet: Quiet = False,
    *,
    options: LoadOptions,
) -> None:
    """Serve a model over HTTP with the OpenAI API."""
    from mach.experts.bank import parse_size
    from mach.experts.parallel import expert_shard
    from mach_serve.server import bind, build_state, follow_requests, run

    memory = parse_size(prompt_cache_bytes, "--prompt-cache-bytes") if prompt_cache else None
    disk = parse_size(prompt_cache_disk_bytes, "--prompt-cache-disk-bytes")

    folder = None if model is None else model_folder(model, quiet)
    shard = expert_shard()
    if shard is not None and shard.rank != 0:  # under mlx.launch: rank 0 alone serves HTTP
        follow_requests(folder, options=options, draft=draft, draft_tokens=draft_tokens)
    sock = bind(host, port)
    if model is not None and not Path(model).expanduser().exists():
        model_name = model_name or model  # a hub id names the model better than its snapshot
    with load_progress(quiet) as progress:
        state = build_state(
            folder,
            model_name=model_name,
            api_key=api_key,
            max_queue=max_queue,
            max_batch=max_batch,
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
            max_prompt_bytes=max_prompt_bytes,
            max_prompt_tokens=max_prompt_tokens,
            options=options,
            draft=draft,
            draft_tokens=draft_tokens,
            prompt_cache_bytes=memory,
            prompt_cache_dir=prompt_cache_dir if prompt_cache else None,
            prompt_cache_disk_bytes=disk,
            progress=progress,
        )
    limits = HTTPLimits(
        keep_alive=keep_alive_timeout,
        header_timeout=header_timeout,
        max_header_bytes=max_header_bytes,
        limit_concurrency=limit_concurrency,
        shutdown_grace=shutdown_grace,
    )
    typer.echo(f"mach: serving {state.model_id} on http://{host}:{port}/v1", err=True)
    run(state, host, port, cors_origin, limits=limits, allowed_hosts=allowed_host, sock=sock)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def serve_main() -> None:
    """Entry point of the ``mach-serve`` console script."""
    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli.command()(serve_command)
    cli(args=sys.argv[1:], prog_name="mach-serve")
