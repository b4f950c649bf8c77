"""Entry point of mach-adapter-gemma: registers ``gemma4``."""

from __future__ import annotations

from typing import Any

from mach import hookimpl


@hookimpl
def register_archs(register: Any) -> None:
    register("mach_adapter_gemma.adapter:Gemma4Adapter", name="gemma4")
