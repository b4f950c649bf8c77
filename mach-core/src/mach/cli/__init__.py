"""The ``mach`` command line (typer). Plugins add commands through ``register_commands``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from mach.errors import MachError

app = typer.Typer(
    name="mach",
    help="Mixture-of-Experts inference on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from mach import __version__

        typer.echo(f"mach {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Mixture-of-Experts inference on MLX."""


F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(func: F) -> F:
    """Turn mach's own errors into one clear line on stderr and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (MachError, ValueError, FileExistsError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc

    return wrapper  # type: ignore[return-value]


def _register_commands() -> None:
    from mach.cli import archs, bench, chat, check, convert, download, generate

    archs.register(app)
    bench.register(app)
    chat.register(app)
    check.register(app)
    convert.register(app)
    download.register(app)
    generate.register(app)
    from mach import plugins

    plugins.load_plugins()
    plugins.pm.hook.register_commands(app=app)


def _format_warning(message: Warning | str, *args: Any, **kwargs: Any) -> str:
    return f"mach: {message}\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mach`` console script."""
    import warnings

    warnings.formatwarning = _format_warning
    _register_commands()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="mach")
