"""Hook specifications for mach plugins (pluggy project name ``mach``)."""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("mach")
hookimpl = pluggy.HookimplMarker("mach")


@hookspec
def register_archs(register: Any) -> None:
    """Register architectures: call ``register(adapter_or_path)`` once per arch key."""


@hookspec(firstresult=True)
def detect_arch(config: dict[str, Any], tensor_names: frozenset[str]) -> str | None:
    """Claim a checkpoint by returning an arch key; stops at first non-None result."""


@hookspec
def register_commands(app: Any) -> None:
    """Add commands to the ``mach`` typer application."""


@hookspec
def register_drafters(register: Any) -> None:
    """Register speculative-decoding draft families: ``register(name, factory)``."""
