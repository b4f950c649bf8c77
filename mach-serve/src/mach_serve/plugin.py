"""Entry point of mach-serve: adds ``mach serve`` to the CLI."""

from __future__ import annotations

from typing import Any

from mach import hookimpl


@hookimpl
def register_commands(app: Any) -> None:
    from mach_serve.cli import register

    register(app)
