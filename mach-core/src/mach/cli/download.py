"""``mach download``: fetch a checkpoint from the Hugging Face hub, only the files mach reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mach.cli import reports_errors
from mach.cli.residency import Arch, Quiet


def fetch_if_missing(model: str, quiet: bool = False) -> Path | None:
    """Fetch hub id ``model`` when it is neither a local path (which always wins) nor complete
    in the local Hugging Face cache; the folder fetched, or ``None`` when nothing was."""
    from mach.io.paths import cached_snapshot, is_hub_id

    if Path(model).expanduser().exists() or not is_hub_id(model):
        return None
    if cached_snapshot(model) is not None:
        return None
    from mach.hub import download

    if not quiet:
        typer.echo(f"mach: fetching {model} from the Hugging Face hub", err=True)
    return download(model, progress=not quiet)


def model_folder(model: str, quiet: bool = False) -> Path:
    """The folder of ``model``: a local path, a hub id complete in the local cache, or else a
    hub id fetched now with ``mach download``'s rules."""
    from mach.io.paths import resolve_model_path

    return fetch_if_missing(model, quiet) or resolve_model_path(model)


@reports_errors
def download_command(
    repo_id: Annotated[str, typer.Argument(help="Hub id, org/name.")],
    revision: Annotated[
        Optional[str],  # noqa: UP045 - typer reads the annotation at run time
        typer.Option(help="Branch, tag or commit (default: main)."),
    ] = None,
    local_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Put the files in this folder instead of the Hugging Face cache."),
    ] = None,
    arch: Arch = None,
    quiet: Quiet = False,
) -> None:
    """Fetch a checkpoint from the Hugging Face hub: config, weights, tokenizer, chat template
    and draft, nothing else. Prints the folder it is in."""
    from mach.hub import download

    local = Path(repo_id).expanduser()
    if local.exists():
        typer.echo(f"mach: {repo_id} is a local folder; nothing to fetch", err=True)
        typer.echo(str(local))
        return
    folder = download(repo_id, revision=revision, local_dir=local_dir, arch=arch,
                      progress=not quiet)  # fmt: skip
    typer.echo(str(folder))


def register(app: typer.Typer) -> None:
    app.command("download")(download_command)
